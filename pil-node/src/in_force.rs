//! A value a reload replaces while the node serves (the legal configuration, TLS,
//! issuer keys, the audit signing key, the peers). Readers take the one in force as
//! an `Arc` and keep it for as long as their request runs; a replacement affects the
//! next read only. A panic elsewhere while the lock was held cannot leave the value
//! half-replaced (it is one pointer), so a poisoned lock is still used.

use std::sync::{Arc, RwLock};

pub struct InForce<T>(RwLock<Arc<T>>);

impl<T> InForce<T> {
    pub fn new(value: T) -> Self {
        Self(RwLock::new(Arc::new(value)))
    }

    /// The value in force now.
    pub fn get(&self) -> Arc<T> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts `fresh` in force for every later read.
    pub fn set(&self, fresh: T) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(fresh);
    }
}
