//! A consumer's state in the fleet, decided from what it last reported: the one rule the
//! reporter's fleet page, its metrics, `quarry-producer status` and `republish` all apply.

use std::time::Duration;

/// How often a consumer reports to the fleet table that it is alive and what it has in hand.
pub const HEARTBEAT: Duration = Duration::from_secs(10);

/// A consumer silent for longer than this (three missed heartbeats) is lost.
pub const LOST_AFTER: Duration = Duration::from_secs(3 * HEARTBEAT.as_secs());

/// Where a consumer of the fleet is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FleetState {
    /// It reported within `LOST_AFTER`.
    Alive,
    /// Silent for longer than `LOST_AFTER`, without saying goodbye: dead, or cut off. Its
    /// leases lapse and its jobs are published again.
    Lost,
    /// It said goodbye.
    Stopped,
}

impl FleetState {
    /// The states, in order.
    pub const ALL: [FleetState; 3] = [FleetState::Alive, FleetState::Lost, FleetState::Stopped];

    /// The state of a consumer that has `stopped` (or not) and last reported `silent_for` ago.
    pub fn of(stopped: bool, silent_for: Duration) -> FleetState {
        if stopped {
            FleetState::Stopped
        } else if silent_for > LOST_AFTER {
            FleetState::Lost
        } else {
            FleetState::Alive
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FleetState::Alive => "alive",
            FleetState::Lost => "lost",
            FleetState::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for FleetState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `pad`, so that the terminal's tables can align it.
        f.pad(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_consumer_is_lost_after_three_missed_heartbeats_and_stopped_once_it_said_so() {
        assert_eq!(FleetState::of(false, Duration::ZERO), FleetState::Alive);
        assert_eq!(FleetState::of(false, 3 * HEARTBEAT), FleetState::Alive);
        assert_eq!(
            FleetState::of(false, 3 * HEARTBEAT + Duration::from_secs(1)),
            FleetState::Lost
        );
        assert_eq!(FleetState::of(true, Duration::ZERO), FleetState::Stopped);
        assert_eq!(format!("{:<7}|", FleetState::Lost), "lost   |");
    }
}
