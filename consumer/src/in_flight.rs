//! One piece of work per key at a time: the second caller asking for the same key waits for the
//! first to finish, then finds what it left (a file fetched once, sources extracted once)
//! instead of doing it again. The gates are forgotten once nobody holds or awaits them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

#[derive(Default)]
pub struct InFlight {
    gates: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// A caller's turn at a key: no other caller has one for that key until it is dropped.
pub struct Turn<'a> {
    in_flight: &'a InFlight,
    key: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl InFlight {
    /// Waits for the turn at `key` (cancel-safe: a caller that stops waiting holds nothing).
    pub async fn turn(&self, key: String) -> Turn<'_> {
        let gate = self
            .gates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        let guard = gate.lock_owned().await;
        Turn {
            in_flight: self,
            key,
            guard: Some(guard),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.gates.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut gates = self
            .in_flight
            .gates
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        drop(self.guard.take());
        // Only the map holds it: nobody waits, so the next caller may start a new gate.
        if gates
            .get(&self.key)
            .is_some_and(|gate| Arc::strong_count(gate) == 1)
        {
            gates.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn one_caller_per_key_at_a_time_and_the_gates_are_forgotten() {
        let in_flight = Arc::new(InFlight::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let (in_flight, inside, most) = (in_flight.clone(), inside.clone(), most.clone());
                tokio::spawn(async move {
                    // Two keys: each admits one at a time, the two side by side.
                    let _turn = in_flight.turn(format!("key-{}", i % 2)).await;
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(
            most.load(Ordering::SeqCst),
            2,
            "one per key, both keys at once"
        );
        assert_eq!(in_flight.len(), 0);
    }
}
