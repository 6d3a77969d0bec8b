//! Bearer-key checks for the ingest and admin APIs, and what each key is granted.
//!
//! Keys are compared as SHA-256 digests in constant time, and every configured key is compared, so
//! neither the position of a match nor the length of a key shows in the timing. A key is granted one
//! thing: on the ingest listener the accounts it may send events for (`Scope`), on the admin listener
//! its role (`AdminRole`). The set is replaced whole on a reload (`replace`): a request is checked
//! against the old set or the new one, never a mix.

use crate::config::{AdminRole, Secret, Server};
use axum::http::HeaderMap;
use sha2::{Digest, Sha256};
use std::sync::{Arc, RwLock};
use subtle::{ConditionallySelectable, ConstantTimeEq};

/// The accounts an ingest key may send events for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Every,
    Only(Arc<[String]>),
}

impl Scope {
    pub fn allows(&self, account: &str) -> bool {
        match self {
            Scope::Every => true,
            Scope::Only(accounts) => accounts.iter().any(|a| a == account),
        }
    }
}

pub struct ApiKeys<G> {
    current: RwLock<Arc<KeySet<G>>>,
}

struct KeySet<G> {
    keys: Vec<([u8; 32], G)>,
    /// What a request without a key is granted (only when no key is configured and the
    /// configuration allows unauthenticated access).
    open: Option<G>,
}

impl<G: Clone> ApiKeys<G> {
    pub fn new<'a>(keys: impl IntoIterator<Item = (&'a Secret, G)>, open: Option<G>) -> Self {
        let keys: Vec<([u8; 32], G)> = keys
            .into_iter()
            .map(|(k, g)| (Sha256::digest(k.expose().as_bytes()).into(), g))
            .collect();
        let open = if keys.is_empty() { open } else { None };
        ApiKeys {
            current: RwLock::new(Arc::new(KeySet { keys, open })),
        }
    }

    fn set(&self) -> Arc<KeySet<G>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Takes `other`'s keys in place of these, at once.
    pub fn replace(&self, other: ApiKeys<G>) {
        let new = other.set();
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = new;
    }

    /// Whether no request can pass: no key configured and unauthenticated access not allowed.
    pub fn accepts_none(&self) -> bool {
        let set = self.set();
        set.keys.is_empty() && set.open.is_none()
    }

    /// What the request's key is granted, or `Err(detail)` when it carries no accepted key.
    pub fn check(&self, headers: &HeaderMap) -> Result<G, &'static str> {
        let set = self.set();
        if let Some(open) = &set.open {
            return Ok(open.clone());
        }
        let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
            return Err("missing Authorization header; send Authorization: Bearer <api key>");
        };
        let value = value.to_str().unwrap_or("");
        let token = match value.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
            _ => return Err("Authorization must be Bearer <api key>"),
        };
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // The place of the match plus one (0: none), chosen without a branch on any comparison.
        let mut found = 0u64;
        for (i, (digest, _)) in set.keys.iter().enumerate() {
            found.conditional_assign(&(i as u64 + 1), digest.ct_eq(&presented));
        }
        match usize::try_from(found).ok().and_then(|f| f.checked_sub(1)) {
            Some(i) => set
                .keys
                .get(i)
                .map(|(_, g)| g.clone())
                .ok_or("the API key is not valid"),
            None => Err("the API key is not valid"),
        }
    }
}

/// The ingest listener's keys: `server.api_keys` for every account, `[[server.keys]]` for theirs.
pub fn ingest_keys(server: &Server) -> ApiKeys<Scope> {
    let every = server.api_keys.iter().map(|k| (k, Scope::Every));
    let scoped = server.keys.iter().map(|k| {
        let scope = match &k.accounts {
            None => Scope::Every,
            Some(a) => Scope::Only(a.clone().into()),
        };
        (&k.key, scope)
    });
    ApiKeys::new(
        every.chain(scoped),
        server.allow_unauthenticated.then_some(Scope::Every),
    )
}

/// The admin listener's keys: `server.admin_api_keys` are `write` keys, `[[server.admin_keys]]` have
/// their role.
pub fn admin_keys(server: &Server) -> ApiKeys<AdminRole> {
    let write = server.admin_api_keys.iter().map(|k| (k, AdminRole::Write));
    let roles = server.admin_keys.iter().map(|k| (&k.key, k.role));
    ApiKeys::new(write.chain(roles), None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn bearer(key: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            axum::http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {key}")).unwrap(),
        );
        h
    }

    #[test]
    fn each_key_gets_what_it_was_granted() {
        let (a, b, c) = (Secret::new("k-a"), Secret::new("k-b"), Secret::new("k-c"));
        let keys = ApiKeys::new([(&a, 1), (&b, 2), (&c, 3)], None);
        assert_eq!(keys.check(&bearer("k-a")), Ok(1));
        assert_eq!(keys.check(&bearer("k-c")), Ok(3));
        assert_eq!(keys.check(&bearer("k-b")), Ok(2));
        assert!(keys.check(&bearer("k-d")).is_err());
        assert!(keys.check(&HeaderMap::new()).is_err());
        assert!(!keys.accepts_none());
        // A reload takes the new set whole.
        let d = Secret::new("k-d");
        keys.replace(ApiKeys::new([(&d, 4)], None));
        assert_eq!(keys.check(&bearer("k-d")), Ok(4));
        assert!(keys.check(&bearer("k-a")).is_err());
    }

    #[test]
    fn unauthenticated_access_only_without_keys() {
        let open: ApiKeys<u8> = ApiKeys::new([], Some(7));
        assert_eq!(open.check(&HeaderMap::new()), Ok(7));
        let k = Secret::new("k");
        let keyed = ApiKeys::new([(&k, 1)], Some(7));
        assert!(keyed.check(&HeaderMap::new()).is_err());
        let none: ApiKeys<u8> = ApiKeys::new([], None);
        assert!(none.accepts_none());
    }

    #[test]
    fn a_scope_allows_its_accounts_only() {
        let s = Scope::Only(vec!["shop".to_string()].into());
        assert!(s.allows("shop") && !s.allows("blog"));
        assert!(Scope::Every.allows("blog"));
    }
}
