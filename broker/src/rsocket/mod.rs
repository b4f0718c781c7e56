//! RSocket 1.0: frames and their codec, composite metadata and its extensions, fragmentation. Plain
//! functions over bytes, with no sockets or clocks.

pub mod fragment;
pub mod frame;
pub mod metadata;
