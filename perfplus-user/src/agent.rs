//! The per-host agent daemon.
