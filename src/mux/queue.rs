//! The queues between an endpoint and its connections, bounded in bytes: a client's (a client
//! that falls too far behind is not reading and is closed) and a backend's (its clients wait for
//! room, so nothing piles up in memory for a backend that does not read).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Bytes queued in every queue of the process together (`limits.max_queued_bytes` bounds it:
/// over it, new calls are refused).
static QUEUED: AtomicUsize = AtomicUsize::new(0);

/// Bytes queued in every queue of the process together.
pub fn queued_bytes() -> usize {
    QUEUED.load(Ordering::Relaxed)
}

/// `bytes` left a queue (taken, or dropped with it).
pub(super) fn dequeued(bytes: usize) {
    QUEUED.fetch_sub(bytes, Ordering::Relaxed);
}

use futures_channel::mpsc as queue;
use tokio::sync::{mpsc, Semaphore};

use crate::duplex::Message;

/// The sending side of a client's queue. The queue is bounded in bytes, not frames, so a burst
/// of small frames to a client that reads is fine, while a client that stops reading is found.
#[derive(Clone)]
pub(super) struct ClientTx {
    /// futures' channel rather than tokio's: it allocates nothing up front, where tokio's takes
    /// a 1.8 KB block per channel (an HTTP call makes one; every idle client holds one).
    pub(super) tx: queue::UnboundedSender<(Message, usize)>,
    pub(super) queued: Arc<AtomicUsize>,
    pub(super) budget: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Push {
    Sent,
    Gone,
    Full,
}

impl ClientTx {
    /// A client's queue of at most `budget` bytes.
    pub(super) fn channel(budget: usize) -> (ClientTx, ClientRx) {
        let (tx, rx) = queue::unbounded();
        let queued = Arc::new(AtomicUsize::new(0));
        (
            ClientTx {
                tx,
                queued: queued.clone(),
                budget,
            },
            ClientRx { rx, queued },
        )
    }

    pub(super) fn push(&self, msg: Message) -> Push {
        let size = msg.approx_len();
        let reserved = self
            .queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |queued| {
                (queued + size <= self.budget).then_some(queued + size)
            });
        if reserved.is_err() {
            return Push::Full;
        }
        // Counted before it is queued: the receiver may take it (and count it out) at once.
        QUEUED.fetch_add(size, Ordering::Relaxed);
        match self.tx.unbounded_send((msg, size)) {
            Ok(()) => Push::Sent,
            Err(_) => {
                dequeued(size);
                Push::Gone
            }
        }
    }
}

/// The receiving side of a client's queue.
pub(super) struct ClientRx {
    rx: queue::UnboundedReceiver<(Message, usize)>,
    /// Bytes queued (shared with the sending side).
    queued: Arc<AtomicUsize>,
}

impl ClientRx {
    /// The next frame; None once every sender is gone.
    pub(super) async fn recv(&mut self) -> Option<Message> {
        use futures_util::StreamExt;
        let item = self.rx.next().await?;
        Some(self.took(item))
    }

    /// A frame already queued, without waiting.
    pub(super) fn try_recv(&mut self) -> Option<Message> {
        let item = self.rx.try_recv().ok()?;
        Some(self.took(item))
    }

    fn took(&self, (msg, size): (Message, usize)) -> Message {
        self.queued.fetch_sub(size, Ordering::Relaxed);
        dequeued(size);
        msg
    }
}

impl Drop for ClientRx {
    fn drop(&mut self) {
        // What is still queued goes with the queue.
        self.rx.close();
        while let Ok((_, size)) = self.rx.try_recv() {
            dequeued(size);
        }
    }
}

/// The backend's queue is closed (the backend left).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Closed;

/// The sending side of a backend's queue, bounded in bytes: a sender waits for room, so the
/// clients of a backend that does not read wait for it instead of piling frames up in memory.
#[derive(Clone)]
pub(super) struct BackendTx {
    pub(super) tx: mpsc::UnboundedSender<(String, u32)>,
    /// Free bytes in the queue; closed when the backend is.
    pub(super) room: Arc<Semaphore>,
    pub(super) budget: u32,
}

impl BackendTx {
    pub(super) fn channel(budget: usize) -> (BackendTx, BackendRx) {
        let budget = u32::try_from(budget).unwrap_or(u32::MAX).max(1);
        let (tx, rx) = mpsc::unbounded_channel();
        let room = Arc::new(Semaphore::new(budget as usize));
        (
            BackendTx {
                tx,
                room: room.clone(),
                budget,
            },
            BackendRx { rx, room },
        )
    }

    /// What a frame takes of the budget (a frame over the whole budget takes all of it, so it
    /// still goes through, alone).
    pub(super) fn cost(&self, frame: &str) -> u32 {
        u32::try_from(frame.len())
            .unwrap_or(u32::MAX)
            .clamp(1, self.budget)
    }

    /// Queues a frame, waiting for room. Err when the backend is closed.
    pub(super) async fn send(&self, frame: String) -> Result<(), Closed> {
        let cost = self.cost(&frame);
        let permit = self.room.acquire_many(cost).await.map_err(|_| Closed)?;
        permit.forget();
        QUEUED.fetch_add(cost as usize, Ordering::Relaxed);
        self.tx.send((frame, cost)).map_err(|_| {
            dequeued(cost as usize);
            Closed
        })
    }

    /// Queues a frame if there is room now.
    pub(super) fn try_send(&self, frame: String) -> Result<(), Option<String>> {
        let cost = self.cost(&frame);
        match self.room.try_acquire_many(cost) {
            Ok(permit) => {
                permit.forget();
                QUEUED.fetch_add(cost as usize, Ordering::Relaxed);
                self.tx.send((frame, cost)).map_err(|_| {
                    dequeued(cost as usize);
                    None
                })
            }
            Err(tokio::sync::TryAcquireError::NoPermits) => Err(Some(frame)),
            Err(tokio::sync::TryAcquireError::Closed) => Err(None),
        }
    }

    /// Wakes every sender waiting for room: the backend is gone.
    pub(super) fn close(&self) {
        self.room.close();
    }
}

/// The receiving side of a backend's queue.
pub(super) struct BackendRx {
    pub(super) rx: mpsc::UnboundedReceiver<(String, u32)>,
    pub(super) room: Arc<Semaphore>,
}

impl BackendRx {
    pub(super) fn took(&self, (frame, cost): (String, u32)) -> String {
        self.room.add_permits(cost as usize);
        dequeued(cost as usize);
        frame
    }
}

impl Drop for BackendRx {
    fn drop(&mut self) {
        // What is still queued goes with the queue.
        self.rx.close();
        while let Ok((_, cost)) = self.rx.try_recv() {
            dequeued(cost as usize);
        }
    }
}

/// Queues frames for a backend without waiting (from places that cannot wait): what does not
/// fit now is queued by a task of its own.
pub(super) fn send_nowait(tx: &BackendTx, frames: Vec<String>) {
    for frame in frames {
        if let Err(Some(frame)) = tx.try_send(frame) {
            let tx = tx.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = tx.send(frame).await;
                });
            }
        }
    }
}
