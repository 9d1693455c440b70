//! Architecture-specific register-only switches for the `fast` backend.
//!
//! Only x86_64 has one today; elsewhere [`crate::Backend::default`] is `Ucontext` and asking
//! for `Fast` falls back to it (see [`crate::Backend::effective`]).

#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
pub(crate) use x86_64::{bootstrap, switch};

/// Whether this build has a `fast` switch.
pub(crate) const HAS_FAST: bool = cfg!(target_arch = "x86_64");
