//! Benchmark: PullImage through the node agent against the same pull sent straight to containerd.

fn main() {}
