//! Re-reading configuration while the node serves: on SIGHUP or an operator's call.
//!
//! One place decides what a reload covers, so both triggers behave the same: the
//! legal configuration (swapped atomically, or kept when the new one is invalid) and
//! the settings that follow from it. It holds no registry handle, so it never keeps
//! the database open past shutdown.

use std::sync::Arc;

use crate::{
    access::{Access, AccessError},
    registry::PointerLifetime,
};

/// Reloads a running node's configuration. Cheap to clone.
#[derive(Clone)]
pub struct Reloader {
    access: Arc<Access>,
    lifetime: PointerLifetime,
}

impl Reloader {
    /// Applies the settings of the legal configuration now in force.
    pub fn new(access: Arc<Access>, lifetime: PointerLifetime) -> Self {
        let this = Self { access, lifetime };
        this.apply_settings();
        this
    }

    /// Re-reads the legal configuration; returns the number of policies in force. On
    /// error nothing changes.
    pub fn reload(&self) -> Result<usize, AccessError> {
        let policies = self.access.reload()?;
        self.apply_settings();
        Ok(policies)
    }

    fn apply_settings(&self) {
        let legal = self.access.legal();
        self.lifetime
            .set_days(legal.settings().retention.pointer_lifetime_days);
    }
}
