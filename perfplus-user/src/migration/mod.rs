//! Migration engine: the source's pre-copy rounds and the destination's receiver.
