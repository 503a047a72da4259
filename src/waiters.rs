//! Registry of tool calls waiting for their flow run to finish, keyed by flow-run id.
//!
//! The events subscription resolves entries. A [`Waiter`] removes its own entry when dropped,
//! so an entry never outlives its caller, whether the caller completed, timed out or left.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::prefect::State;

/// Number of terminal states remembered for runs that no waiter has registered for yet.
const RECENT_CAPACITY: usize = 1024;

/// Path by which the service learned that a run reached a terminal state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompletionSource {
    /// A flow-run state event on the websocket.
    Event,
    /// A REST read of the run: the check after registering, a fallback poll or a safety poll.
    Poll,
}

/// A terminal state delivered to a waiter.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub state: State,
    pub source: CompletionSource,
}

/// Result of handing a completion to [`WaiterRegistry::resolve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// The waiting caller received it.
    Delivered,
    /// A waiter was registered but its caller had already left; nothing to do.
    CallerGone,
    /// No waiter is registered for this run, so it is remembered briefly in case a waiter registers next.
    NoWaiter,
}

/// Error returned by [`Waiter::completion`] when the registry was closed at shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the service is shutting down and stopped waiting for flow runs")]
pub struct RegistryClosed;

/// Map of flow-run id to the `oneshot` sender of the caller waiting for it.
#[derive(Debug, Default)]
pub struct WaiterRegistry {
    waiters: DashMap<Uuid, oneshot::Sender<Completion>>,
    /// Latest non-terminal state name of waiting runs that reported one, for progress.
    states: DashMap<Uuid, String>,
    recent: Mutex<RecentCompletions>,
    /// Set by [`WaiterRegistry::close_all`]; later registrations end at once.
    closed: AtomicBool,
}

impl WaiterRegistry {
    /// Creates an empty registry.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Registers a waiter for `flow_run_id`. When the run's terminal state arrived before this
    /// call (the run finished between its creation and this registration), the waiter is
    /// resolved at once.
    pub fn register(self: &Arc<Self>, flow_run_id: Uuid) -> Waiter {
        let (sender, receiver) = oneshot::channel();
        self.waiters.insert(flow_run_id, sender);
        // Checked after inserting, so a registration racing with `close_all` cannot leave an
        // entry that nothing will ever resolve.
        if self.closed.load(Ordering::SeqCst) {
            self.waiters.remove(&flow_run_id);
        }
        // Look for an early completion only after inserting, so a completion that arrives in
        // between is delivered by `resolve` instead of being missed.
        let early = self.recent_completions().remove(&flow_run_id);
        if let Some(completion) = early {
            self.resolve(flow_run_id, completion);
        }
        Waiter { flow_run_id, receiver, registry: Arc::clone(self) }
    }

    /// Hands a terminal state to the run's waiter, removing the entry.
    pub fn resolve(&self, flow_run_id: Uuid, completion: Completion) -> Resolution {
        self.states.remove(&flow_run_id);
        let Some((_, sender)) = self.waiters.remove(&flow_run_id) else {
            self.recent_completions().insert(flow_run_id, completion);
            return Resolution::NoWaiter;
        };
        // A failed send means the caller dropped its receiver between our removal and now.
        match sender.send(completion) {
            Ok(()) => Resolution::Delivered,
            Err(_) => Resolution::CallerGone,
        }
    }

    /// Records the latest non-terminal state of a waiting run. Runs without a waiter are
    /// ignored.
    pub fn note_state(&self, flow_run_id: Uuid, state_name: &str) {
        if !self.waiters.contains_key(&flow_run_id) {
            return;
        }
        self.states.insert(flow_run_id, state_name.to_owned());
        // Checked again after inserting, so a waiter dropped in between leaves no entry.
        if !self.waiters.contains_key(&flow_run_id) {
            self.states.remove(&flow_run_id);
        }
    }

    /// Returns the latest non-terminal state recorded for a waiting run.
    pub fn latest_state(&self, flow_run_id: Uuid) -> Option<String> {
        self.states.get(&flow_run_id).map(|state| state.clone())
    }

    /// Ids of every run with a waiting caller, for bulk REST checks.
    pub fn waiting_ids(&self) -> Vec<Uuid> {
        self.waiters.iter().map(|entry| *entry.key()).collect()
    }

    /// Returns true when some caller waits for `flow_run_id`.
    pub fn is_waiting(&self, flow_run_id: Uuid) -> bool {
        self.waiters.contains_key(&flow_run_id)
    }

    /// Number of waiting callers.
    pub fn len(&self) -> usize {
        self.waiters.len()
    }

    /// Returns true when no job waits.
    pub fn is_empty(&self) -> bool {
        self.waiters.is_empty()
    }

    /// Ends every wait with [`RegistryClosed`], at shutdown.
    pub fn close_all(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.waiters.clear();
        self.states.clear();
    }

    fn recent_completions(&self) -> std::sync::MutexGuard<'_, RecentCompletions> {
        // The lock guards plain map updates that cannot panic half-way, so a poisoned lock
        // still holds consistent data.
        self.recent.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn forget(&self, flow_run_id: Uuid) {
        self.waiters.remove(&flow_run_id);
        self.states.remove(&flow_run_id);
    }
}

/// A caller's place in the registry. Dropping it removes the entry.
#[derive(Debug)]
pub struct Waiter {
    flow_run_id: Uuid,
    receiver: oneshot::Receiver<Completion>,
    registry: Arc<WaiterRegistry>,
}

impl Waiter {
    /// Returns the flow run this waiter waits for.
    pub fn flow_run_id(&self) -> Uuid {
        self.flow_run_id
    }

    /// Waits for the run's terminal state.
    ///
    /// # Errors
    /// Returns [`RegistryClosed`] when the service shuts down first.
    ///
    /// # Cancellation
    /// Cancel safe: dropping the future leaves the waiter registered, and dropping the
    /// [`Waiter`] removes it.
    pub async fn completion(&mut self) -> Result<Completion, RegistryClosed> {
        (&mut self.receiver).await.map_err(|_| RegistryClosed)
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.registry.forget(self.flow_run_id);
    }
}

/// Terminal states of runs that had no waiter yet, oldest dropped first.
#[derive(Debug, Default)]
struct RecentCompletions {
    order: VecDeque<Uuid>,
    by_id: HashMap<Uuid, Completion>,
}

impl RecentCompletions {
    fn insert(&mut self, flow_run_id: Uuid, completion: Completion) {
        if self.by_id.insert(flow_run_id, completion).is_none() {
            self.order.push_back(flow_run_id);
        }
        while self.order.len() > RECENT_CAPACITY {
            if let Some(oldest) = self.order.pop_front() {
                self.by_id.remove(&oldest);
            }
        }
    }

    fn remove(&mut self, flow_run_id: &Uuid) -> Option<Completion> {
        // The id stays in `order` until it ages out; `insert` skips ids already there.
        self.by_id.remove(flow_run_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prefect::StateType;

    #[test]
    fn latest_state_is_kept_while_waiting() {
        let registry = WaiterRegistry::new();
        let id = Uuid::new_v4();
        let waiter = registry.register(id);

        registry.note_state(id, "Pending");
        registry.note_state(id, "Running");
        assert_eq!(registry.latest_state(id).as_deref(), Some("Running"));

        drop(waiter);
        assert_eq!(registry.latest_state(id), None);
    }

    #[test]
    fn state_of_unwaited_run_is_ignored() {
        let registry = WaiterRegistry::new();
        let id = Uuid::new_v4();

        registry.note_state(id, "Running");

        assert_eq!(registry.latest_state(id), None);
    }

    fn completed() -> Completion {
        Completion {
            state: State {
                state_type: StateType::Completed,
                name: "Completed".to_owned(),
                message: None,
                timestamp: None,
            },
            source: CompletionSource::Event,
        }
    }

    #[tokio::test]
    async fn resolve_delivers_to_registered_waiter() {
        let registry = WaiterRegistry::new();
        let id = Uuid::new_v4();
        let mut waiter = registry.register(id);

        assert_eq!(registry.resolve(id, completed()), Resolution::Delivered);
        assert_eq!(waiter.completion().await, Ok(completed()));
        assert!(registry.is_empty());
    }

    #[tokio::test]
    async fn dropping_waiter_removes_entry() {
        let registry = WaiterRegistry::new();
        let id = Uuid::new_v4();
        let waiter = registry.register(id);
        assert!(registry.is_waiting(id));

        drop(waiter);
        assert!(!registry.is_waiting(id));
        assert!(registry.is_empty());
    }

    #[tokio::test]
    async fn completion_before_registration_is_delivered() {
        let registry = WaiterRegistry::new();
        let id = Uuid::new_v4();
        assert_eq!(registry.resolve(id, completed()), Resolution::NoWaiter);

        let mut waiter = registry.register(id);
        let completion = tokio_test::assert_ready!(tokio_test::task::spawn(waiter.completion()).poll());
        assert_eq!(completion, Ok(completed()));
        assert!(registry.is_empty());
    }

    #[tokio::test]
    async fn waiter_stays_pending_until_resolved() {
        let registry = WaiterRegistry::new();
        let mut waiter = registry.register(Uuid::new_v4());
        let mut completion = tokio_test::task::spawn(waiter.completion());
        tokio_test::assert_pending!(completion.poll());
    }

    #[tokio::test]
    async fn resolve_after_caller_left_is_harmless() {
        let registry = WaiterRegistry::new();
        let id = Uuid::new_v4();
        let waiter = registry.register(id);
        drop(waiter);

        assert_eq!(registry.resolve(id, completed()), Resolution::NoWaiter);
        assert!(registry.is_empty());
    }

    #[tokio::test]
    async fn second_resolve_of_same_run_finds_no_waiter() {
        let registry = WaiterRegistry::new();
        let id = Uuid::new_v4();
        let _waiter = registry.register(id);
        assert_eq!(registry.resolve(id, completed()), Resolution::Delivered);
        assert_eq!(registry.resolve(id, completed()), Resolution::NoWaiter);
    }

    #[tokio::test]
    async fn registration_after_close_ends_at_once() {
        let registry = WaiterRegistry::new();
        registry.close_all();
        let mut waiter = registry.register(Uuid::new_v4());
        assert_eq!(waiter.completion().await, Err(RegistryClosed));
        assert!(registry.is_empty());
    }

    #[tokio::test]
    async fn close_all_ends_every_wait() {
        let registry = WaiterRegistry::new();
        let mut waiters: Vec<_> = (0..3).map(|_| registry.register(Uuid::new_v4())).collect();
        registry.close_all();
        for waiter in &mut waiters {
            assert_eq!(waiter.completion().await, Err(RegistryClosed));
        }
    }

    #[test]
    fn recent_completions_are_bounded() {
        let registry = WaiterRegistry::new();
        for _ in 0..RECENT_CAPACITY * 3 {
            registry.resolve(Uuid::new_v4(), completed());
        }
        let recent = registry.recent_completions();
        assert_eq!(recent.by_id.len(), RECENT_CAPACITY);
        assert_eq!(recent.order.len(), RECENT_CAPACITY);
    }

    #[tokio::test]
    async fn many_concurrent_waiters_each_get_their_own_run() {
        let registry = WaiterRegistry::new();
        let ids: Vec<Uuid> = (0..500).map(|_| Uuid::new_v4()).collect();
        let tasks: Vec<_> = ids
            .iter()
            .map(|&id| {
                let mut waiter = registry.register(id);
                tokio::spawn(async move { (id, waiter.completion().await) })
            })
            .collect();
        for &id in ids.iter().rev() {
            registry.resolve(id, completed());
        }
        for task in tasks {
            let (_, completion) = task.await.expect("waiter task panicked");
            assert_eq!(completion, Ok(completed()));
        }
        assert!(registry.is_empty());
    }
}
