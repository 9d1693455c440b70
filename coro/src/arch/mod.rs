//! Architecture-specific register-only switches for the `fast` backend.
//!
//! x86_64 and aarch64 have one (one file each, same contract: [`switch`] and [`bootstrap`]);
//! elsewhere [`crate::Backend::default`] is `Ucontext` and asking for `Fast` falls back to
//! it (see [`crate::Backend::effective`]).

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "aarch64")]
pub(crate) use aarch64::{bootstrap, switch};
#[cfg(target_arch = "x86_64")]
pub(crate) use x86_64::{bootstrap, switch};

/// Whether this build has a `fast` switch.
pub(crate) const HAS_FAST: bool = cfg!(any(target_arch = "x86_64", target_arch = "aarch64"));

