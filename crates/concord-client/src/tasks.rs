//! Work-queue calls.

use crate::{pct, Client};
use concord_core::api::*;
use concord_core::Result;
use reqwest::Method;
use serde_json::Value;
use std::time::Duration;

impl Client {
    /// Enqueues a task. Spooled in degraded mode, with the caller's idempotency
    /// key or one the spool assigns, so a replay never enqueues it twice.
    pub async fn enqueue(&self, req: &EnqueueRequest) -> Result<TaskEnvelope> {
        self.write_typed(crate::SpoolKind::Task, req).await
    }
    pub async fn enqueue_batch(&self, tasks: Vec<EnqueueRequest>) -> Result<TaskList> {
        self.post("/v1/tasks/batch", &EnqueueBatchRequest { tasks })
            .await
    }
    /// Claims up to `max` tasks, waiting up to `wait_ms` for one.
    pub async fn claim(
        &self,
        queues: &[&str],
        max: u32,
        lease_ms: Option<i64>,
        wait_ms: u64,
    ) -> Result<Vec<ClaimedTask>> {
        let req = ClaimRequest {
            queues: queues.iter().map(|q| q.to_string()).collect(),
            max: Some(max),
            lease_ms,
            wait_ms: Some(wait_ms),
        };
        self.call_timeout::<_, ClaimResponse>(
            Method::POST,
            "/v1/tasks/claim",
            Some(&req),
            Duration::from_millis(wait_ms + 30_000),
        )
        .await
        .map(|r| r.tasks)
    }
    pub async fn heartbeat_task(
        &self,
        id: &str,
        claim: &str,
        progress: Option<Value>,
    ) -> Result<TaskLease> {
        self.post(
            &format!("/v1/tasks/{}/heartbeat", pct(id)),
            &TaskHeartbeatRequest {
                claim: claim.into(),
                progress,
            },
        )
        .await
    }
    pub async fn complete_task(&self, id: &str, claim: &str, result: Value) -> Result<Task> {
        self.post::<_, TaskEnvelope>(
            &format!("/v1/tasks/{}/complete", pct(id)),
            &CompleteRequest {
                claim: claim.into(),
                result,
                claim_next: None,
            },
        )
        .await
        .map(|e| e.task)
    }
    /// Completes a task and claims as `next` asks in the same transaction (both
    /// or neither), then waits up to its `wait_ms` if that found nothing: a
    /// worker's loop in one call.
    pub async fn complete_and_claim(
        &self,
        id: &str,
        claim: &str,
        result: Value,
        next: ClaimRequest,
    ) -> Result<(Task, Vec<ClaimedTask>)> {
        let wait_ms = next.wait_ms.unwrap_or(0);
        let req = CompleteRequest {
            claim: claim.into(),
            result,
            claim_next: Some(next),
        };
        self.call_timeout::<_, TaskEnvelope>(
            Method::POST,
            &format!("/v1/tasks/{}/complete", pct(id)),
            Some(&req),
            Duration::from_millis(wait_ms + 30_000),
        )
        .await
        .map(|e| (e.task, e.next.unwrap_or_default()))
    }
    pub async fn complete_batch(&self, items: Vec<CompleteItem>) -> Result<Vec<ItemOutcome>> {
        self.post::<_, CompleteBatchResponse>(
            "/v1/tasks/complete",
            &CompleteBatchRequest {
                items,
                claim_next: None,
            },
        )
        .await
        .map(|r| r.results)
    }
    /// Completes many tasks and claims as `next` asks in the same transaction
    /// (each item keeps its own outcome), then waits up to its `wait_ms` if that
    /// found nothing: a batch worker's loop in one call.
    pub async fn complete_batch_and_claim(
        &self,
        items: Vec<CompleteItem>,
        next: ClaimRequest,
    ) -> Result<(Vec<ItemOutcome>, Vec<ClaimedTask>)> {
        let wait_ms = next.wait_ms.unwrap_or(0);
        let req = CompleteBatchRequest {
            items,
            claim_next: Some(next),
        };
        self.call_timeout::<_, CompleteBatchResponse>(
            Method::POST,
            "/v1/tasks/complete",
            Some(&req),
            Duration::from_millis(wait_ms + 30_000),
        )
        .await
        .map(|r| (r.results, r.next.unwrap_or_default()))
    }
    pub async fn fail_task(&self, id: &str, claim: &str, error: &str, retry: bool) -> Result<Task> {
        let req = FailRequest {
            claim: claim.into(),
            error: error.into(),
            retry: Some(retry),
        };
        self.post::<_, TaskEnvelope>(&format!("/v1/tasks/{}/fail", pct(id)), &req)
            .await
            .map(|e| e.task)
    }
    pub async fn cancel_task(&self, id: &str) -> Result<Task> {
        self.post::<_, TaskEnvelope>(
            &format!("/v1/tasks/{}/cancel", pct(id)),
            &serde_json::json!({}),
        )
        .await
        .map(|e| e.task)
    }
    pub async fn get_task(&self, id: &str) -> Result<Task> {
        self.get::<TaskEnvelope>(&format!("/v1/tasks/{}", pct(id)))
            .await
            .map(|e| e.task)
    }
    pub async fn list_tasks(
        &self,
        queue: Option<&str>,
        state: Option<TaskState>,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Vec<Task>> {
        let mut q = format!("/v1/tasks?limit={limit}");
        if let Some(x) = queue {
            q.push_str(&format!("&queue={}", pct(x)));
        }
        if let Some(s) = state {
            q.push_str(&format!("&state={}", s.as_str()));
        }
        if let Some(a) = after {
            q.push_str(&format!("&after={}", pct(a)));
        }
        self.get::<TaskList>(&q).await.map(|l| l.tasks)
    }
    pub async fn queues(&self) -> Result<Vec<QueueStats>> {
        self.get::<QueueList>("/v1/queues").await.map(|l| l.queues)
    }
    pub async fn put_schedule(&self, name: &str, req: &PutScheduleRequest) -> Result<Schedule> {
        self.call(
            Method::PUT,
            &format!("/v1/schedules/{}", pct(name)),
            Some(req),
        )
        .await
    }
    pub async fn schedules(&self) -> Result<Vec<Schedule>> {
        self.get::<ScheduleList>("/v1/schedules")
            .await
            .map(|l| l.schedules)
    }
    pub async fn delete_schedule(&self, name: &str) -> Result<Deleted> {
        self.call::<(), _>(
            Method::DELETE,
            &format!("/v1/schedules/{}", pct(name)),
            None,
        )
        .await
    }
}

impl Client {
    /// Sends one command to many agents; with `wait` (default) answers when done.
    pub async fn dispatch(&self, req: &DispatchRequest) -> Result<DispatchView> {
        let timeout =
            Duration::from_millis(req.timeout_ms.unwrap_or(30_000).max(0) as u64 + 30_000);
        self.call_timeout(Method::POST, "/v1/dispatch", Some(req), timeout)
            .await
    }
    pub async fn get_dispatch(&self, id: &str) -> Result<DispatchView> {
        self.get(&format!("/v1/dispatch/{}", pct(id))).await
    }
}
