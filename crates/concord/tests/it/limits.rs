use crate::harness::*;
use concord_core::api::{CreateTokenRequest, Role};
use concord_core::token::TokenKind;
use concord_core::ErrorCode;
use std::time::{Duration, Instant};

#[tokio::test]
async fn limits_answer_with_documented_errors_and_spare_everyone_else() {
    let hub = Hub::start_with(&[
        "--max-instances-per-entity",
        "3",
        "--rate-limit",
        "50",
        "--max-streams-per-token",
        "2",
    ]);
    let admin = hub.admin();
    for i in 0..3 {
        admin
            .register(&reg("capped", Role::Secondary, Some(&format!("i{i}"))))
            .await
            .unwrap();
    }
    let err = admin
        .register(&reg("capped", Role::Secondary, Some("one too many")))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Conflict);
    assert_eq!(err.details["limit"], 3);

    let flooder = admin.with_token(
        admin
            .create_token(&CreateTokenRequest {
                kind: TokenKind::Reader,
                entity: None,
                name: Some("flood".into()),
            })
            .await
            .unwrap()
            .token,
    );
    let bystander = admin.with_token(
        admin
            .create_token(&CreateTokenRequest {
                kind: TokenKind::Reader,
                entity: None,
                name: Some("calm".into()),
            })
            .await
            .unwrap()
            .token,
    );
    // One token floods: it is told to back off (429 with Retry-After)…
    let flood = {
        let f = flooder.clone();
        tokio::spawn(async move {
            let mut limited = 0;
            for _ in 0..400 {
                if let Err(e) = f.entities().await {
                    assert_eq!(e.code, ErrorCode::RateLimited);
                    limited += 1;
                }
            }
            limited
        })
    };
    // …while another token's requests keep being answered.
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        bystander.entities().await.unwrap();
        worst = worst.max(t.elapsed());
    }
    let limited = flood.await.unwrap();
    assert!(limited > 0, "the flood was never limited");
    eprintln!(
        "limits: {limited} of 400 flood calls limited; the bystander's slowest call took {worst:?}"
    );
    let resp = reqwest::Client::new()
        .get(format!("{}/v1/entities", hub.url))
        .bearer_auth(flooder.token().unwrap())
        .send()
        .await
        .unwrap();
    if resp.status().as_u16() == 429 {
        assert!(resp.headers().contains_key("retry-after"));
    }

    // Open streams per token.
    let mut streams = Vec::new();
    for _ in 0..2 {
        streams.push(bystander.stream_events(">", None, None).await.unwrap());
    }
    let err = bystander
        .stream_events(">", None, None)
        .await
        .err()
        .expect("a third stream is refused");
    assert_eq!(err.code, ErrorCode::RateLimited);
    drop(streams);
    eventually(Duration::from_secs(10), "stream slots to be freed", || {
        let b = bystander.clone();
        async move { b.stream_events(">", None, None).await.ok().map(|_| ()) }
    })
    .await;
}
