//! capsule-tests: end-to-end fixtures shared by the tests in `tests/tests/`.
