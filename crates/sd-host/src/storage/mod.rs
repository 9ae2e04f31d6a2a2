//! Content-addressed blob storage for images, keyed by the SHA-256 of the bytes.
//!
//! Reads, listing and deletes go through `object_store` (local disk now, S3 later). Local writes are done
//! here as temp file → fsync → rename → fsync(dir), because `object_store`'s local backend renames without
//! fsync and a crash must never leave a half-written or empty blob visible.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};
use sha2::{Digest, Sha256};

use crate::api::extract::is_sha256_hex;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("invalid blob id")]
    InvalidId,
    #[error("blob not found")]
    NotFound,
    #[error("storage error: {0}")]
    Store(#[from] object_store::Error),
    #[error("io error: {0}")]
    Io(#[from] std::io::Error),
}

pub type StorageResult<T> = Result<T, StorageError>;

#[derive(Clone)]
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
    /// Set for the local backend: where durable writes go directly.
    local_root: Option<PathBuf>,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl BlobStore {
    pub fn local(root: &Path) -> StorageResult<Self> {
        std::fs::create_dir_all(root)?;
        let root = root.canonicalize()?;
        let store = LocalFileSystem::new_with_prefix(&root)?;
        Ok(Self {
            store: Arc::new(store),
            local_root: Some(root),
        })
    }

    /// Any backend (S3, in-memory for tests); writes go through `put`.
    pub fn from_store(store: Arc<dyn ObjectStore>) -> Self {
        Self {
            store,
            local_root: None,
        }
    }

    /// `ab/abcdef…`: the id is validated first, so no request text ever becomes a path.
    fn key(hash: &str) -> StorageResult<ObjectPath> {
        if !is_sha256_hex(hash) {
            return Err(StorageError::InvalidId);
        }
        Ok(ObjectPath::from(format!("{}/{}", &hash[..2], hash)))
    }

    /// Local backend: a blob is only a regular file in a real shard directory. A symlink planted in the
    /// store (for the file or its shard) is treated as absent, so it can never lead outside the root.
    fn check_local(&self, hash: &str) -> StorageResult<()> {
        let Some(root) = &self.local_root else {
            return Ok(());
        };
        let key = Self::key(hash)?;
        let shard = root.join(&hash[..2]);
        let file = root.join(key.as_ref());
        let real_dir = std::fs::symlink_metadata(&shard).is_ok_and(|m| m.is_dir());
        let real_file = std::fs::symlink_metadata(&file).is_ok_and(|m| m.is_file());
        if real_dir && real_file {
            Ok(())
        } else {
            Err(StorageError::NotFound)
        }
    }

    /// Stores `bytes` under their SHA-256 and returns it. Identical bytes are stored once.
    pub async fn put(&self, bytes: Bytes) -> StorageResult<String> {
        let hash = sha256_hex(&bytes);
        let key = Self::key(&hash)?;
        if self.exists(&hash).await? {
            return Ok(hash);
        }
        match &self.local_root {
            Some(root) => {
                let shard = root.join(&hash[..2]);
                if std::fs::symlink_metadata(&shard).is_ok_and(|m| !m.is_dir()) {
                    // Never write through a link planted in place of a shard directory.
                    return Err(StorageError::Io(std::io::Error::other(format!(
                        "{} is not a directory",
                        shard.display()
                    ))));
                }
                let root = root.clone();
                let key_str = key.to_string();
                tokio::task::spawn_blocking(move || {
                    crate::util::write_file_atomic(&root.join(key_str), &bytes)
                })
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))??;
            }
            None => {
                self.store.put(&key, PutPayload::from(bytes)).await?;
            }
        }
        Ok(hash)
    }

    pub async fn exists(&self, hash: &str) -> StorageResult<bool> {
        match self.check_local(hash) {
            Err(StorageError::NotFound) => return Ok(false),
            Err(e) => return Err(e),
            Ok(()) => {}
        }
        match self.store.head(&Self::key(hash)?).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn get(&self, hash: &str) -> StorageResult<Bytes> {
        self.check_local(hash)?;
        match self.store.get(&Self::key(hash)?).await {
            Ok(r) => Ok(r.bytes().await?),
            Err(object_store::Error::NotFound { .. }) => Err(StorageError::NotFound),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn get_range(&self, hash: &str, range: Range<u64>) -> StorageResult<Bytes> {
        self.check_local(hash)?;
        match self.store.get_range(&Self::key(hash)?, range).await {
            Ok(b) => Ok(b),
            Err(object_store::Error::NotFound { .. }) => Err(StorageError::NotFound),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn size(&self, hash: &str) -> StorageResult<u64> {
        self.check_local(hash)?;
        match self.store.head(&Self::key(hash)?).await {
            Ok(m) => Ok(m.size),
            Err(object_store::Error::NotFound { .. }) => Err(StorageError::NotFound),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn delete(&self, hash: &str) -> StorageResult<()> {
        match self.store.delete(&Self::key(hash)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Every stored blob id with its age (for the orphan sweep). Entries that are not ours are skipped.
    pub async fn list_with_age(&self) -> StorageResult<Vec<(String, std::time::Duration)>> {
        let metas: Vec<_> = self.store.list(None).try_collect().await?;
        let now = chrono::Utc::now();
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let name = m.location.filename()?.to_string();
                // Only `ab/<hash>` entries are blobs; temp files and anything planted elsewhere are not.
                let expected = format!("{}/{}", name.get(..2)?, name);
                (is_sha256_hex(&name) && m.location.as_ref() == expected).then(|| {
                    let age = (now - m.last_modified).to_std().unwrap_or_default();
                    (name, age)
                })
            })
            .collect())
    }

    /// Every stored blob id (for the orphan sweep). Entries that are not ours are skipped.
    pub async fn list(&self) -> StorageResult<Vec<String>> {
        let metas: Vec<_> = self.store.list(None).try_collect().await?;
        Ok(metas
            .into_iter()
            .filter_map(|m| m.location.filename().map(str::to_string))
            .filter(|name| is_sha256_hex(name))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_is_content_addressed_and_deduplicated() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::local(dir.path()).unwrap();
        let a = store.put(Bytes::from_static(b"hello")).await.unwrap();
        assert_eq!(a, sha256_hex(b"hello"));
        let again = store.put(Bytes::from_static(b"hello")).await.unwrap();
        assert_eq!(a, again);
        assert_eq!(store.list().await.unwrap(), vec![a.clone()]);
        assert_eq!(&store.get(&a).await.unwrap()[..], b"hello");
        assert_eq!(&store.get_range(&a, 1..3).await.unwrap()[..], b"el");
        assert_eq!(store.size(&a).await.unwrap(), 5);
        store.delete(&a).await.unwrap();
        assert!(!store.exists(&a).await.unwrap());
        assert!(matches!(store.get(&a).await, Err(StorageError::NotFound)));
    }

    #[tokio::test]
    async fn invalid_ids_never_reach_the_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::local(dir.path()).unwrap();
        for bad in [
            "../../etc/passwd",
            "/etc/passwd",
            "..%2f..%2fx",
            &"A".repeat(64),
        ] {
            assert!(matches!(store.get(bad).await, Err(StorageError::InvalidId)));
        }
    }
}
