//! The gRPC health service as the relay runs it: tonic-health's, except that `Watch` streams
//! end once the relay shuts down, after they have told their watcher `NOT_SERVING`.
//!
//! Load balancers and client-side health checking keep a `Watch` open for the life of a
//! connection; the gRPC server waits for every open call before it stops, so an open `Watch`
//! would hold every shutdown for its whole grace period and make it look unclean.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic_health::pb::health_server::Health;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::HealthService;

/// [`HealthService`] whose watches end at shutdown.
pub struct EndingHealth {
    inner: HealthService,
    stop: CancellationToken,
}

impl EndingHealth {
    /// Serves `inner`, ending its watches once `stop` is cancelled (after the statuses set
    /// before it was cancelled have been sent).
    pub fn new(inner: HealthService, stop: CancellationToken) -> Self {
        EndingHealth { inner, stop }
    }
}

#[tonic::async_trait]
impl Health for EndingHealth {
    type WatchStream = EndingWatch;

    async fn check(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        self.inner.check(request).await
    }

    async fn watch(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<EndingWatch>, tonic::Status> {
        let inner = self.inner.watch(request).await?.into_inner();
        Ok(tonic::Response::new(EndingWatch {
            inner: Box::pin(inner),
            stopped: Box::pin(self.stop.clone().cancelled_owned()),
        }))
    }
}

type Statuses = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, tonic::Status>> + Send>>;

/// A `Watch` stream that ends at shutdown: whatever status is ready is sent first, so the
/// watcher learns `NOT_SERVING` before the stream ends.
pub struct EndingWatch {
    inner: Statuses,
    stopped: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Stream for EndingWatch {
    type Item = Result<HealthCheckResponse, tonic::Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.inner.as_mut().poll_next(cx) {
            Poll::Ready(item) => Poll::Ready(item),
            Poll::Pending => match self.stopped.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a test should fail loudly at the broken step")]
mod tests {
    use futures::StreamExt as _;
    use tonic_health::ServingStatus;
    use tonic_health::pb::health_check_response::ServingStatus as Status;

    use super::*;

    #[tokio::test]
    async fn a_watch_hears_not_serving_and_then_ends_at_shutdown() {
        let reporter = tonic_health::server::HealthReporter::new();
        let service = HealthService::from_health_reporter(reporter.clone());
        reporter.set_service_status("", ServingStatus::Serving).await;
        let stop = CancellationToken::new();
        let health = EndingHealth::new(service, stop.clone());
        let mut watch = health
            .watch(tonic::Request::new(HealthCheckRequest {
                service: String::new(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(watch.next().await.unwrap().unwrap().status(), Status::Serving);
        // Shutdown as the relay does it: NOT_SERVING first, then the servers stop.
        reporter.set_service_status("", ServingStatus::NotServing).await;
        stop.cancel();
        assert_eq!(watch.next().await.unwrap().unwrap().status(), Status::NotServing);
        let end = tokio::time::timeout(std::time::Duration::from_secs(5), watch.next()).await;
        assert!(matches!(end, Ok(None)), "the watch ends");
        // A check still answers.
        let checked = health
            .check(tonic::Request::new(HealthCheckRequest {
                service: String::new(),
            }))
            .await
            .unwrap();
        assert_eq!(checked.into_inner().status(), Status::NotServing);
    }
}
