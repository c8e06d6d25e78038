//! Typed wrappers over [`Client::call`]: each checks that the reply has the shape its
//! operation promises, so callers never match on [`Reply`] themselves.

use kekd_proto::{
    Context, EdekItem, ItemResult, KeyInfo, KeyName, MalformedResponse, Metadata, Op, Reply, StatusInfo,
    TargetState, WrapItem,
};

use crate::{Client, ClientError};

fn unexpected(op: &str) -> ClientError {
    MalformedResponse(format!("unexpected reply to {op}")).into()
}

impl Client {
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
        self.batch(Op::Generate { key: key.clone(), edek_only, contexts }, n, metadata).await
    }

    /// Wraps caller secrets under the key's active version.
    pub async fn wrap(
        &self,
        key: &KeyName,
        items: Vec<WrapItem>,
        metadata: Metadata,
    ) -> Result<Vec<ItemResult>, ClientError> {
        let n = items.len();
        self.batch(Op::Wrap { key: key.clone(), items }, n, metadata).await
    }

    /// Recovers the secrets inside EDEKs; each item needs the context it was wrapped with.
    pub async fn unwrap(
        &self,
        items: Vec<EdekItem>,
        metadata: Metadata,
    ) -> Result<Vec<ItemResult>, ClientError> {
        let n = items.len();
        self.batch(Op::Unwrap(items), n, metadata).await
    }

    /// Re-encrypts EDEKs under their key's active version without the plaintext leaving
    /// the daemon.
    pub async fn rewrap(
        &self,
        items: Vec<EdekItem>,
        metadata: Metadata,
    ) -> Result<Vec<ItemResult>, ClientError> {
        let n = items.len();
        self.batch(Op::Rewrap(items), n, metadata).await
    }

    pub async fn status(&self, metadata: Metadata) -> Result<StatusInfo, ClientError> {
        match self.call(Op::Status, metadata).await? {
            Reply::Status(s) => Ok(s),
            _ => Err(unexpected("Status")),
        }
    }

    pub async fn create_key(&self, key: &KeyName, metadata: Metadata) -> Result<KeyInfo, ClientError> {
        self.key_op(Op::CreateKey(key.clone()), metadata).await
    }

    pub async fn rotate_key(&self, key: &KeyName, metadata: Metadata) -> Result<KeyInfo, ClientError> {
        self.key_op(Op::RotateKey(key.clone()), metadata).await
    }

    /// Disables, re-enables (`DecryptOnly`) or destroys one version.
    pub async fn set_version_state(
        &self,
        key: &KeyName,
        version: u32,
        state: TargetState,
        metadata: Metadata,
    ) -> Result<KeyInfo, ClientError> {
        self.key_op(Op::SetVersionState { key: key.clone(), version, state }, metadata).await
    }

    pub async fn list_keys(&self, metadata: Metadata) -> Result<Vec<KeyInfo>, ClientError> {
        match self.call(Op::ListKeys, metadata).await? {
            Reply::Keys(keys) => Ok(keys),
            _ => Err(unexpected("ListKeys")),
        }
    }

    /// Per-item results line up with the request's items by position, so a reply with a
    /// different count cannot be trusted at all.
    async fn batch(
        &self,
        op: Op,
        expected: usize,
        metadata: Metadata,
    ) -> Result<Vec<ItemResult>, ClientError> {
        let name = op.name();
        match self.call(op, metadata).await? {
            Reply::Batch(items) if items.len() == expected => Ok(items),
            Reply::Batch(items) => {
                Err(MalformedResponse(format!("{name}: {} results for {expected} items", items.len())).into())
            }
            _ => Err(unexpected(name)),
        }
    }

    async fn key_op(&self, op: Op, metadata: Metadata) -> Result<KeyInfo, ClientError> {
        let name = op.name();
        match self.call(op, metadata).await? {
            Reply::Key(k) => Ok(k),
            _ => Err(unexpected(name)),
        }
    }
}
