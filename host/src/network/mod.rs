//! Pod networking on the host: what connects a sandbox's guest to the
//! network namespace its pod was given.

pub mod tap;
pub mod tcfilter;
