//! The dashboard at `/ui`: a few server-rendered pages and one embedded script
//! that fills them from the hub's own `/v1` API and keeps them live from the SSE
//! stream (`/v1/events/stream`).
//!
//! Why built this way: the pages must update without reload, so the data views are
//! drawn in the browser anyway; drawing them only there (from the same JSON every
//! other client reads) keeps one rendering path and no template engine. The server
//! renders the frame of each page (navigation, headings, forms with their labels,
//! the session's CSRF token) and the login page, and owns the session. The script
//! calls the ordinary `/v1` routes with the session cookie (see [`crate::extract::Caller`]
//! for why that is safe), so a reader and an admin can do in the dashboard exactly
//! what their tokens may do through the API, decided by `concord_core::authz` alone.
//!
//! Nothing here is part of the JSON API: these routes are neither in
//! [`crate::ROUTES`] nor in `/openapi.json`. Assets are compiled into the binary;
//! the pages load nothing from elsewhere, and the Content-Security-Policy says so.

mod pages;
pub mod session;

use crate::AppState;
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, HOST, LOCATION, ORIGIN, REFERRER_POLICY,
    SET_COOKIE, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use concord_core::authz::Principal;
use concord_core::token::{hash_secret, TokenKind};
use concord_core::{ids, Error};
use pages::Page;
use session::Session;
use std::sync::Arc;

const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");
const ICON_SVG: &str = include_str!("assets/icon.svg");

/// Everything the pages may load: this hub only; no inline script or style, no
/// framing (clickjacking an admin's "confirm" button), forms post only here.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; \
    frame-ancestors 'none'; form-action 'self'";

pub(crate) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/ui", get(fleet))
        .route("/ui/", get(fleet))
        .route("/ui/instances/{id}", get(instance))
        .route("/ui/queues", get(queues))
        .route("/ui/memory", get(memory))
        .route("/ui/events", get(events))
        .route("/ui/breakers", get(breakers))
        .route("/ui/tokens", get(tokens))
        .route("/ui/login", get(login_form).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/assets/{file}", get(asset))
        .layer(axum::middleware::from_fn(security_headers))
}

async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    // `same-origin`, not `no-referrer`: under `no-referrer` browsers send
    // `Origin: null` on form posts, and the login checks the origin.
    h.insert(REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.entry(CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    resp
}

/// The dashboard session a request carries, for [`crate::extract::Caller`]: `None`
/// without a (live) session cookie; an error when the method is unsafe and the
/// request lacks the session's CSRF token.
pub(crate) fn session_of(parts: &Parts, state: &AppState) -> concord_core::Result<Option<Session>> {
    let Some(session) =
        session::cookie_id(&parts.headers).and_then(|id| state.ui_sessions.get(&id))
    else {
        return Ok(None);
    };
    if !matches!(parts.method, Method::GET | Method::HEAD) {
        let presented = parts
            .headers
            .get(session::CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !session::csrf_matches(&session.csrf, presented) {
            return Err(Error::forbidden(
                "the dashboard session's CSRF token is missing or wrong (header X-Concord-CSRF)",
            ));
        }
    }
    Ok(Some(session))
}

/// The session of a page request and the principal it stands for; `None` sends the
/// browser to the login page (no session, expired, or its token revoked).
async fn logged_in(state: &AppState, headers: &HeaderMap) -> Option<(Session, Principal)> {
    let id = session::cookie_id(headers)?;
    let session = state.ui_sessions.get(&id)?;
    match state
        .auth
        .authenticate_hash(&state.store, &state.metrics, session.token_hash.clone())
        .await
    {
        Ok(p) => Some((session, p)),
        Err(_) => {
            state.ui_sessions.remove(&id);
            None
        }
    }
}

fn redirect(to: &'static str) -> Response {
    (StatusCode::SEE_OTHER, [(LOCATION, to)]).into_response()
}

fn html(status: StatusCode, body: String) -> Response {
    (status, [(CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response()
}

async fn page(state: &AppState, headers: &HeaderMap, page: Page, id: Option<&str>) -> Response {
    let Some((session, principal)) = logged_in(state, headers).await else {
        return redirect("/ui/login");
    };
    html(
        StatusCode::OK,
        pages::shell(&pages::Frame {
            page,
            id,
            principal: &principal,
            csrf: &session.csrf,
            now_ms: state.now_ms(),
        }),
    )
}

async fn fleet(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    page(&s, &headers, Page::Fleet, None).await
}

async fn instance(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if !ids::has_prefix(&id, ids::INSTANCE) {
        return html(
            StatusCode::NOT_FOUND,
            pages::message_page("Not found", "That is not an instance id (ins_…)."),
        );
    }
    page(&s, &headers, Page::Instance, Some(&id)).await
}

async fn queues(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    page(&s, &headers, Page::Queues, None).await
}

async fn memory(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    page(&s, &headers, Page::Memory, None).await
}

async fn events(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    page(&s, &headers, Page::Events, None).await
}

async fn breakers(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    page(&s, &headers, Page::Breakers, None).await
}

async fn tokens(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    page(&s, &headers, Page::Tokens, None).await
}

async fn login_form(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if logged_in(&s, &headers).await.is_some() {
        return redirect("/ui");
    }
    html(StatusCode::OK, pages::login_page(None))
}

/// A form post from another site (an `Origin` that is not this host) is refused:
/// it could log a victim in as the attacker, or out.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers
        .get(HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let origin_host = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .unwrap_or("");
    !host.is_empty() && origin_host.eq_ignore_ascii_case(host)
}

/// The browser reached the hub over TLS (as far as a proxy in front tells).
fn over_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

fn form_field(body: &[u8], name: &str) -> Option<String> {
    form_urlencoded::parse(body)
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

async fn login(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    if !same_origin(&headers) {
        return html(
            StatusCode::FORBIDDEN,
            pages::login_page(Some("This login came from another site and was refused.")),
        );
    }
    let token = form_field(&body, "token").unwrap_or_default();
    let token = token.trim();
    if token.is_empty() {
        return html(
            StatusCode::BAD_REQUEST,
            pages::login_page(Some("token: paste a reader or admin token.")),
        );
    }
    let principal = match s.auth.authenticate(&s.store, &s.metrics, token).await {
        Ok(p) => p,
        Err(e) if e.code == concord_core::ErrorCode::Unauthorized => {
            return html(
                StatusCode::UNAUTHORIZED,
                pages::login_page(Some("token: unknown or revoked.")),
            )
        }
        Err(e) => {
            return html(
                StatusCode::SERVICE_UNAVAILABLE,
                pages::login_page(Some(&format!(
                    "The hub cannot check tokens now: {}",
                    e.message
                ))),
            )
        }
    };
    if !matches!(principal.kind, TokenKind::Admin | TokenKind::Reader) {
        return html(
            StatusCode::FORBIDDEN,
            pages::login_page(Some(&format!(
                "token: {} tokens cannot open the dashboard; use a reader or admin token.",
                principal.kind.as_str()
            ))),
        );
    }
    let (id, _) = s.ui_sessions.create(hash_secret(token));
    let cookie = session::set_cookie(&id, over_tls(&headers));
    (
        StatusCode::SEE_OTHER,
        [(LOCATION, "/ui".to_string()), (SET_COOKIE, cookie)],
    )
        .into_response()
}

async fn logout(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(id) = session::cookie_id(&headers) {
        if let Some(session) = s.ui_sessions.get(&id) {
            let presented = form_field(&body, "csrf").unwrap_or_default();
            if !same_origin(&headers) || !session::csrf_matches(&session.csrf, &presented) {
                return html(
                    StatusCode::FORBIDDEN,
                    pages::message_page(
                        "Refused",
                        "This logout did not carry the session's CSRF token.",
                    ),
                );
            }
            s.ui_sessions.remove(&id);
        }
    }
    (
        StatusCode::SEE_OTHER,
        [
            (LOCATION, "/ui/login".to_string()),
            (SET_COOKIE, session::clear_cookie()),
        ],
    )
        .into_response()
}

async fn asset(Path(file): Path<String>) -> Response {
    let (body, kind) = match file.as_str() {
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "app.css" => (APP_CSS, "text/css; charset=utf-8"),
        "icon.svg" => (ICON_SVG, "image/svg+xml"),
        _ => return (StatusCode::NOT_FOUND, "no such asset").into_response(),
    };
    // Revalidated on every load: the hub may have been upgraded underneath.
    ([(CONTENT_TYPE, kind), (CACHE_CONTROL, "no-cache")], body).into_response()
}
