//! [`BatchQueue`]: requests from many tasks served in batches, one batch at
//! a time, the way a database rewards them: one statement and one commit for
//! every request that queued while the previous batch ran.

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
/// stops waiting is still served (its answer is dropped).
pub struct BatchQueue<Req, Resp> {
    queue: mpsc::UnboundedSender<Queued<Req, Resp>>,
}

/// The queue's task is gone (the runtime is shutting down, or `serve`
/// panicked): the request may or may not have been served.
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
        let responses = serve(requests).await;
        for (reply, response) in replies.into_iter().zip(responses) {
            let _ = reply.send(response);
        }
    }
}
