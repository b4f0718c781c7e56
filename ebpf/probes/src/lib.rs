//! Host-side stub of `vigil-probes`: the real programs are the `vigil-probes` binary built for
//! `bpfel-unknown-none` (see `main.rs`); this empty library lets cargo treat the crate as a normal member.
#![no_std]
