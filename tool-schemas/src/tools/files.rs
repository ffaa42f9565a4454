//! The file tools: `write_file`, `read_file`, `list_files`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------

/// How file content is encoded in a tool call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ContentEncoding {
    /// UTF-8 text.
    #[default]
    Text,
    /// Base64 of arbitrary bytes.
    Base64,
}

/// Write a file in a sandbox, creating missing parent directories. Content is
/// text by default; use `encoding: base64` for binary data. Set `append` to add
/// to the end of an existing file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteFileParams {
    /// Destination path, absolute or relative to the sandbox's work directory.
    pub path: String,
    /// The content (at most 16 MiB once decoded).
    pub content: String,
    /// How `content` is encoded. Default: `text`.
    pub encoding: Option<ContentEncoding>,
    /// Sandbox to write in. Default: this session's default sandbox.
    pub sandbox_id: Option<String>,
    /// Permission bits as an octal string, e.g. `"755"` for an executable script. Default `"644"`.
    pub mode: Option<String>,
    /// Append to the file instead of replacing it. Default false.
    pub append: Option<bool>,
}

/// Result of `write_file`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WriteFileResult {
    /// The sandbox written to.
    pub sandbox_id: String,
    /// The path written.
    pub path: String,
    /// Bytes written by this call.
    pub bytes_written: u64,
}

/// Read a file from a sandbox. Text comes back as text; images (PNG, JPEG,
/// GIF, WebP) come back as image content; other binary data as base64. Large
/// files are read in pieces with `offset` and `limit`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadFileParams {
    /// Path, absolute or relative to the sandbox's work directory.
    pub path: String,
    /// Sandbox to read from. Default: this session's default sandbox.
    pub sandbox_id: Option<String>,
    /// Byte offset to start at. Default 0.
    pub offset: Option<u64>,
    /// Most bytes to return. Default 262144 (256 KiB), at most 4194304 (4 MiB).
    pub limit: Option<u64>,
}

/// Result of `read_file`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReadFileResult {
    /// The sandbox read from.
    pub sandbox_id: String,
    /// The path read.
    pub path: String,
    /// The file's whole size in bytes.
    pub size: u64,
    /// Offset of the first byte returned.
    pub offset: u64,
    /// Bytes returned.
    pub bytes_read: u64,
    /// How `content` is encoded: `text`, `base64`, or `image` (the bytes are in the image content).
    pub encoding: String,
    /// The content: text, or base64; absent for images.
    pub content: Option<String>,
    /// MIME type, for images.
    pub mime_type: Option<String>,
    /// Whether bytes remain after this piece; read on from `next_offset`.
    pub has_more: bool,
    /// Offset to pass next time to continue.
    pub next_offset: u64,
}

/// List the files under a directory of a sandbox, with size, kind and mode.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListFilesParams {
    /// Directory to list. Default: the sandbox's work directory.
    pub path: Option<String>,
    /// How deep to descend: 1 lists direct entries only. Default 1, at most 8.
    pub depth: Option<u32>,
    /// Sandbox to list. Default: this session's default sandbox.
    pub sandbox_id: Option<String>,
}

/// Kinds of filesystem entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// Anything else.
    Other,
}

/// One entry of `list_files`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FileEntry {
    /// Path relative to the listed directory.
    pub path: String,
    /// What it is.
    pub kind: FileKind,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits as an octal string, e.g. `"644"`.
    pub mode: String,
    /// Last modification, in milliseconds since the Unix epoch.
    pub modified_unix_ms: i64,
}

/// Result of `list_files`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ListFilesResult {
    /// The sandbox listed.
    pub sandbox_id: String,
    /// The directory listed.
    pub path: String,
    /// Its entries (at most 2000).
    pub entries: Vec<FileEntry>,
    /// Whether entries were left out because there were more than 2000.
    pub truncated: bool,
}
