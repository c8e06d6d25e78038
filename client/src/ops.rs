//! Typed wrappers over `call`: each checks that the reply has the shape its operation
//! promises, so callers never match on [`Reply`] themselves.
//!
//! The wrappers are written once and stamped onto both [`Client`] (one connection) and
//! [`PooledClient`] (a tenant's pooled connection, with retries) as inherent methods, so
//! the two offer the same calls and callers need no trait in scope.

use kekd_proto::{
    Context, EdekItem, ItemResult, KeyInfo, KeyName, MalformedResponse, Metadata, Op, Reply, StatusInfo,
    TargetState, WrapItem,
};

use crate::{Client, ClientError, PooledClient};

/// Implements the typed operations on a type that has
/// `async fn call(&self, Op, Metadata) -> Result<Reply, ClientError>`. Paths in the body
/// resolve here, where the macro is invoked.
macro_rules! typed_ops {
    ($ty:ty) => {
        impl $ty {
            /// Generates one data key per context under the key's active version. With
            /// `edek_only` the daemon returns only the wrapped keys.
            pub async fn generate(
                &self,
                key: &KeyName,
                contexts: Vec<Context>,
                edek_only: bool,
                metadata: Metadata,
            ) -> Result<Vec<ItemResult>, ClientError> {
                let n = contexts.len();
                let op = Op::Generate { key: key.clone(), edek_only, contexts };
                batch(op.name(), n, self.call(op, metadata).await?)
            }

            /// Wraps caller secrets under the key's active version.
            pub async fn wrap(
                &self,
                key: &KeyName,
                items: Vec<WrapItem>,
                metadata: Metadata,
            ) -> Result<Vec<ItemResult>, ClientError> {
                let n = items.len();
                let op = Op::Wrap { key: key.clone(), items };
                batch(op.name(), n, self.call(op, metadata).await?)
            }

            /// Recovers the secrets inside EDEKs; each item needs the context it was
            /// wrapped with.
            pub async fn unwrap(
                &self,
                items: Vec<EdekItem>,
                metadata: Metadata,
            ) -> Result<Vec<ItemResult>, ClientError> {
                let n = items.len();
                let op = Op::Unwrap(items);
                batch(op.name(), n, self.call(op, metadata).await?)
            }

            /// Re-encrypts EDEKs under their key's active version without the plaintext
            /// leaving the daemon.
            pub async fn rewrap(
                &self,
                items: Vec<EdekItem>,
                metadata: Metadata,
            ) -> Result<Vec<ItemResult>, ClientError> {
                let n = items.len();
                let op = Op::Rewrap(items);
                batch(op.name(), n, self.call(op, metadata).await?)
            }

            pub async fn status(&self, metadata: Metadata) -> Result<StatusInfo, ClientError> {
                match self.call(Op::Status, metadata).await? {
                    Reply::Status(s) => Ok(s),
                    _ => Err(unexpected("status")),
                }
            }

            pub async fn create_key(
                &self,
                key: &KeyName,
                metadata: Metadata,
            ) -> Result<KeyInfo, ClientError> {
                let op = Op::CreateKey(key.clone());
                key_info(op.name(), self.call(op, metadata).await?)
            }

            pub async fn rotate_key(
                &self,
                key: &KeyName,
                metadata: Metadata,
            ) -> Result<KeyInfo, ClientError> {
                let op = Op::RotateKey(key.clone());
                key_info(op.name(), self.call(op, metadata).await?)
            }

            /// Disables, re-enables (`DecryptOnly`) or destroys one version.
            pub async fn set_version_state(
                &self,
                key: &KeyName,
                version: u32,
                state: TargetState,
                metadata: Metadata,
            ) -> Result<KeyInfo, ClientError> {
                let op = Op::SetVersionState { key: key.clone(), version, state };
                key_info(op.name(), self.call(op, metadata).await?)
            }

            /// Changes a key's version controls; `None` keeps a value.
            pub async fn set_key_policy(
                &self,
                key: &KeyName,
                min_decrypt_version: Option<u32>,
                keep_versions: Option<u32>,
                metadata: Metadata,
            ) -> Result<KeyInfo, ClientError> {
                let op = Op::SetKeyPolicy { key: key.clone(), min_decrypt_version, keep_versions };
                key_info(op.name(), self.call(op, metadata).await?)
            }

            /// Crypto-shreds every key of the tenant; `confirm` must name it. Returns the
            /// number of keys and of KEK versions shredded.
            pub async fn destroy_tenant(
                &self,
                confirm: &kekd_proto::TenantName,
                metadata: Metadata,
            ) -> Result<(u32, u32), ClientError> {
                match self.call(Op::DestroyTenant { confirm: confirm.clone() }, metadata).await? {
                    Reply::TenantDestroyed { keys, versions_shredded } => Ok((keys, versions_shredded)),
                    _ => Err(unexpected("destroy_tenant")),
                }
            }

            /// Rotates the tenant's root key to the one labelled `label` (created or adopted;
            /// `None`: a generated label). Returns the active label and the records rewrapped.
            pub async fn rotate_root(
                &self,
                label: Option<String>,
                metadata: Metadata,
            ) -> Result<(String, u32), ClientError> {
                match self.call(Op::RotateRoot { label }, metadata).await? {
                    Reply::RootRotated { active, rewrapped } => Ok((active, rewrapped)),
                    _ => Err(unexpected("rotate_root")),
                }
            }

            /// BYOK step 1: the transport public key (PEM and the rest of the reply) for a
            /// root key to be imported as `label`.
            pub async fn root_import_key(
                &self,
                label: String,
                metadata: Metadata,
            ) -> Result<Reply, ClientError> {
                match self.call(Op::RootImportKey { label }, metadata).await? {
                    r @ Reply::TransportKey { .. } => Ok(r),
                    _ => Err(unexpected("root_import_key")),
                }
            }

            /// BYOK step 2: imports the wrapped key material as root key `label` and
            /// rotates to it. Returns the active label and the records rewrapped.
            pub async fn root_import(
                &self,
                label: String,
                algorithm: String,
                wrapped: Vec<u8>,
                metadata: Metadata,
            ) -> Result<(String, u32), ClientError> {
                match self.call(Op::RootImport { label, algorithm, wrapped }, metadata).await? {
                    Reply::RootRotated { active, rewrapped } => Ok((active, rewrapped)),
                    _ => Err(unexpected("root_import")),
                }
            }

            pub async fn list_keys(&self, metadata: Metadata) -> Result<Vec<KeyInfo>, ClientError> {
                match self.call(Op::ListKeys, metadata).await? {
                    Reply::Keys(keys) => Ok(keys),
                    _ => Err(unexpected("list_keys")),
                }
            }
        }
    };
}

typed_ops!(Client);
typed_ops!(PooledClient);

fn unexpected(op: &str) -> ClientError {
    MalformedResponse(format!("unexpected reply to {op}")).into()
}

/// Per-item results line up with the request's items by position, so a reply with a
/// different count cannot be trusted at all.
fn batch(name: &str, expected: usize, reply: Reply) -> Result<Vec<ItemResult>, ClientError> {
    match reply {
        Reply::Batch(items) if items.len() == expected => Ok(items),
        Reply::Batch(items) => {
            Err(MalformedResponse(format!("{name}: {} results for {expected} items", items.len())).into())
        }
        _ => Err(unexpected(name)),
    }
}

fn key_info(name: &str, reply: Reply) -> Result<KeyInfo, ClientError> {
    match reply {
        Reply::Key(k) => Ok(k),
        _ => Err(unexpected(name)),
    }
}
