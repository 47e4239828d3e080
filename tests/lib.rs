//! End-to-end tests live in `e2e/`: one test binary that drives the built `modelpack` binary
//! against real files, real tools (skopeo) and, in later suites, a real registry and containerd.
