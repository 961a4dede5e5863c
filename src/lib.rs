//! Root package: hosts the top-level integration tests in `tests/`.
