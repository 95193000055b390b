//! Tests only: see tests/timers.rs.
