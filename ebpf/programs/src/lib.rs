#![no_std]
// The programs live in the binary target (src/main.rs); this library target only exists so
// that the crate can be a (build) dependency of causeway-datapath for cache invalidation.
