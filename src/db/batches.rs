//! [`BatchQueue`]: requests from many tasks served in batches, one batch at
//! a time, the way a database rewards them: one statement and one commit for
//! every request that queued while the previous batch ran.

use futures_util::FutureExt;
use std::future::Future;
use tokio::sync::{mpsc, oneshot};

type Queued<Req, Resp> = (Req, oneshot::Sender<Resp>);

/// Requests served in batches by one task, one batch at a time: each batch
/// takes the request that woke the task and every request queued meanwhile
/// (up to `max`, and only while `same_batch(first, next)` holds; the next
/// request that does not fit starts the next batch). No window is waited
/// for: a lone request is served at once, and a batch grows only while the
/// one before it runs, so that batching costs a quiet system nothing and a
/// burst one statement per batch instead of one per request.
///
/// The task starts with the queue ([`BatchQueue::start`], inside a Tokio
/// runtime) and ends when the queue is dropped. A request whose caller
/// stops waiting is still served (its answer is dropped). A batch whose
/// `serve` panics is answered [`BatchQueueStopped`], request by request,
/// and the queue goes on with the next batch.
pub struct BatchQueue<Req, Resp> {
    queue: mpsc::UnboundedSender<Queued<Req, Resp>>,
}

/// The request got no response: the queue's task is gone (the runtime is
/// shutting down) or its batch's `serve` panicked. It may or may not have
/// been served.
#[derive(Debug, thiserror::Error)]
#[error("the batch queue has stopped")]
pub struct BatchQueueStopped;

impl<Req: Send + 'static, Resp: Send + 'static> BatchQueue<Req, Resp> {
    /// Starts the queue's task: `serve` gets each batch (at least one
    /// request, at most `max`, in queue order) and returns one response per
    /// request, in the same order (a missing response drops its caller's
    /// answer: [`BatchQueueStopped`]).
    pub fn start<F, Fut>(max: usize, same_batch: fn(&Req, &Req) -> bool, serve: F) -> BatchQueue<Req, Resp>
    where
        F: Fn(Vec<Req>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<Resp>> + Send + 'static,
    {
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(serve_batches(rx, max.max(1), same_batch, serve));
        BatchQueue { queue }
    }

    /// Queues `request` and waits for its response.
    ///
    /// Errors: [`BatchQueueStopped`].
    pub async fn submit(&self, request: Req) -> Result<Resp, BatchQueueStopped> {
        let (reply, answer) = oneshot::channel();
        self.queue.send((request, reply)).map_err(|_| BatchQueueStopped)?;
        answer.await.map_err(|_| BatchQueueStopped)
    }
}

async fn serve_batches<Req, Resp, F, Fut>(mut rx: mpsc::UnboundedReceiver<Queued<Req, Resp>>, max: usize, same_batch: fn(&Req, &Req) -> bool, serve: F)
where
    F: Fn(Vec<Req>) -> Fut,
    Fut: Future<Output = Vec<Resp>>,
{
    let mut held: Option<Queued<Req, Resp>> = None;
    loop {
        let first = match held.take() {
            Some(q) => q,
            None => match rx.recv().await {
                Some(q) => q,
                None => return,
            },
        };
        let mut batch = vec![first];
        while batch.len() < max {
            match rx.try_recv() {
                Ok(q) if same_batch(&batch[0].0, &q.0) => batch.push(q),
                Ok(q) => {
                    held = Some(q);
                    break;
                }
                Err(_) => break,
            }
        }
        let (requests, replies): (Vec<Req>, Vec<oneshot::Sender<Resp>>) = batch.into_iter().unzip();
        let size = requests.len();
        // A batch whose `serve` panics answers none of its requests (their
        // callers see `BatchQueueStopped` and fall back); the queue serves on.
        match std::panic::AssertUnwindSafe(serve(requests)).catch_unwind().await {
            Ok(responses) => {
                for (reply, response) in replies.into_iter().zip(responses) {
                    let _ = reply.send(response);
                }
            }
            Err(_) => tracing::error!(requests = size, "a batch panicked; its requests are answered as stopped and the queue serves on"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Batches are formed from what queued while the previous one ran, up
    /// to `max`, split where `same_batch` says so; each caller gets its own
    /// response; a panicking batch answers its callers `BatchQueueStopped`
    /// and the next batch is served.
    #[tokio::test]
    async fn batches_of_what_queued_meanwhile_each_answered_its_own() {
        let seen: Arc<Mutex<Vec<Vec<u32>>>> = Arc::default();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let queue = {
            let (seen, gate) = (seen.clone(), gate.clone());
            Arc::new(BatchQueue::start(
                3,
                |a: &u32, b: &u32| a / 100 == b / 100,
                move |batch: Vec<u32>| {
                    let (seen, gate) = (seen.clone(), gate.clone());
                    async move {
                        seen.lock().unwrap().push(batch.clone());
                        if batch.contains(&999) {
                            panic!("a batch that panics");
                        }
                        gate.acquire().await.unwrap().forget();
                        batch.into_iter().map(|n| n * 2).collect::<Vec<u32>>()
                    }
                },
            ))
        };
        let submit = |n: u32| {
            let q = queue.clone();
            tokio::spawn(async move { q.submit(n).await })
        };
        // The first is served alone at once and holds the queue (gated).
        let first = submit(1);
        while seen.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        // Queued meanwhile, in order: 2, 3, 4, 5 (same kind), 101 (another kind).
        let rest: Vec<_> = [2, 3, 4, 5, 101].into_iter().map(|n| (n, submit(n))).collect();
        // On this one-thread runtime the spawned submissions run, and queue,
        // as soon as this task yields.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        gate.add_permits(10);
        assert_eq!(first.await.unwrap().unwrap(), 2);
        for (n, handle) in rest {
            assert_eq!(handle.await.unwrap().unwrap(), n * 2, "each caller gets its own response");
        }
        assert_eq!(*seen.lock().unwrap(), vec![vec![1], vec![2, 3, 4], vec![5], vec![101]], "max 3, split by kind");
        // A batch that panics: its caller is answered, the queue serves on.
        assert!(queue.submit(999).await.is_err());
        assert_eq!(queue.submit(7).await.unwrap(), 14);
    }
}
