//! The operator's side: the control client that talks to agents, `perfplus node drain`, and `perfplus
//! track`'s measuring and printing. The `perfplus` binary (`src/main.rs`) parses the command line and calls into here.
pub mod client;
pub mod console;
pub mod drain;
pub mod pki;
pub mod track;
