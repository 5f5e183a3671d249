//! CLI side of the control protocol.
