//! The file tools: `write_file` (chunked, text or base64), `read_file` (text, binary as
//! base64, images attached) and `list_files`.

use base64::Engine as _;
use capsule_agent::protocol::{self as proto, Op, Reply, WriteFileRequest, WritePosition};
use capsule_tool_schemas::{
    ContentEncoding, FileEntry, FileKind, ListFilesParams, ListFilesResult, ReadFileParams, ReadFileResult,
    WriteFileParams, WriteFileResult, DEFAULT_LIST_DEPTH, DEFAULT_READ_LIMIT_BYTES, MAX_LIST_DEPTH, MAX_LIST_ENTRIES,
    MAX_READ_LIMIT_BYTES, MAX_WRITE_BYTES,
};
use rmcp::model::CallToolResult;

use super::shaping::{push_section, tool_result};
use super::tool_error::ToolError;
use super::CapsuleMcp;

/// The image MIME type of `bytes`, from their magic number.
pub fn sniff_image(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        Some("image/jpeg")
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        Some("image/gif")
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some("image/webp")
    } else {
        None
    }
}

impl CapsuleMcp {
    pub(super) async fn write_file(&self, p: WriteFileParams) -> Result<CallToolResult, ToolError> {
        let data = match p.encoding.unwrap_or_default() {
            ContentEncoding::Text => p.content.into_bytes(),
            ContentEncoding::Base64 => base64::engine::general_purpose::STANDARD
                .decode(p.content.trim())
                .map_err(|e| ToolError::BadParameter(format!("content is not valid base64 ({e})")))?,
        };
        if data.len() as u64 > MAX_WRITE_BYTES {
            return Err(ToolError::BadParameter(format!(
                "content is {} bytes, over the limit of {MAX_WRITE_BYTES} per call; write it in parts with append=true",
                data.len()
            )));
        }
        let mode = match &p.mode {
            None => None,
            Some(m) => match u32::from_str_radix(m.trim_start_matches("0o"), 8) {
                Ok(v) if v <= 0o7777 => Some(v),
                _ => {
                    return Err(ToolError::BadParameter(format!(
                        "mode {m:?} is not octal permission bits such as \"644\" or \"755\""
                    )))
                }
            },
        };
        if p.path.is_empty() {
            return Err(ToolError::BadParameter("path is empty".into()));
        }
        let lease = self.lease(p.sandbox_id.as_deref()).await?;
        let append = p.append.unwrap_or(false);
        let mut chunks: Vec<&[u8]> = data.chunks(proto::MAX_FILE_CHUNK_BYTES).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        for (i, chunk) in chunks.into_iter().enumerate() {
            let position = if i == 0 && !append { WritePosition::Truncate } else { WritePosition::Append };
            let op = Op::WriteFile(WriteFileRequest {
                path: p.path.clone(),
                position,
                data: chunk.to_vec(),
                mode,
                create_parents: true,
            });
            self.quick(&lease, "write_file", op).await?;
        }
        let result =
            WriteFileResult { sandbox_id: lease.id.clone(), path: p.path.clone(), bytes_written: data.len() as u64 };
        let text = format!("Wrote {} bytes to {} in sandbox {}.", data.len(), p.path, lease.id);
        Ok(tool_result(&result, text, Vec::new(), false))
    }

    pub(super) async fn read_file(&self, p: ReadFileParams) -> Result<CallToolResult, ToolError> {
        let offset = p.offset.unwrap_or(0);
        let limit = p.limit.unwrap_or(DEFAULT_READ_LIMIT_BYTES);
        if limit == 0 || limit > MAX_READ_LIMIT_BYTES {
            return Err(ToolError::BadParameter(format!(
                "limit={limit} is out of range: use 1 to {MAX_READ_LIMIT_BYTES}"
            )));
        }
        let lease = self.lease(p.sandbox_id.as_deref()).await?;
        let op = Op::ReadFile { path: p.path.clone(), offset, length: limit };
        let (data, size) = match self.quick(&lease, "read_file", op).await? {
            Reply::FileData { data, size } => (data, size),
            other => return Err(Self::unexpected(&lease, "read_file", other)),
        };
        let mut bytes_read = data.len() as u64;
        let mut images = Vec::new();
        let (encoding, content, mime_type) =
            if let (Some(mime), true) = (sniff_image(&data), offset == 0 && bytes_read == size) {
                images.push((base64::engine::general_purpose::STANDARD.encode(&data), mime.to_string()));
                ("image", None, Some(mime.to_string()))
            } else {
                match text_prefix(&data) {
                    Some(text) => {
                        bytes_read = text.len() as u64;
                        ("text", Some(text.to_string()), None)
                    }
                    None => ("base64", Some(base64::engine::general_purpose::STANDARD.encode(&data)), None),
                }
            };
        let next_offset = offset + bytes_read;
        let result = ReadFileResult {
            sandbox_id: lease.id.clone(),
            path: p.path.clone(),
            size,
            offset,
            bytes_read,
            encoding: encoding.to_string(),
            content: content.clone(),
            mime_type,
            has_more: next_offset < size,
            next_offset,
        };
        let mut text = match encoding {
            "image" => format!("{} is an image ({} bytes); it is attached.", p.path, size),
            "base64" => format!(
                "{} is binary; bytes {offset}..{next_offset} of {size} as base64:\n{}",
                p.path,
                content.unwrap_or_default()
            ),
            _ => content.unwrap_or_default(),
        };
        if result.has_more {
            push_section(
                &mut text,
                None,
                &format!("[showing bytes {offset}..{next_offset} of {size}; read on with offset={next_offset}]"),
            );
        }
        Ok(tool_result(&result, text, images, false))
    }

    pub(super) async fn list_files(&self, p: ListFilesParams) -> Result<CallToolResult, ToolError> {
        let depth = p.depth.unwrap_or(DEFAULT_LIST_DEPTH);
        if depth == 0 || depth > MAX_LIST_DEPTH {
            return Err(ToolError::BadParameter(format!("depth={depth} is out of range: use 1 to {MAX_LIST_DEPTH}")));
        }
        let path = p.path.clone().unwrap_or_else(|| ".".to_string());
        let lease = self.lease(p.sandbox_id.as_deref()).await?;
        let entries = match self.quick(&lease, "list_files", Op::ListDir { path: path.clone(), depth }).await? {
            Reply::Entries(e) => e,
            other => return Err(Self::unexpected(&lease, "list_files", other)),
        };
        let truncated = entries.len() > MAX_LIST_ENTRIES;
        let entries: Vec<FileEntry> = entries
            .into_iter()
            .take(MAX_LIST_ENTRIES)
            .map(|e| FileEntry {
                path: e.path,
                kind: match e.stat.kind {
                    proto::FileKind::File => FileKind::File,
                    proto::FileKind::Dir => FileKind::Dir,
                    proto::FileKind::Symlink => FileKind::Symlink,
                    proto::FileKind::Other => FileKind::Other,
                },
                size: e.stat.size,
                mode: format!("{:o}", e.stat.mode),
                modified_unix_ms: e.stat.modified_unix_ms,
            })
            .collect();
        let mut text = String::new();
        for e in &entries {
            let suffix = if e.kind == FileKind::Dir { "/" } else { "" };
            text.push_str(&format!("{:>10}  {}  {}{}\n", e.size, e.mode, e.path, suffix));
        }
        if entries.is_empty() {
            text = format!("{path} is empty.");
        }
        if truncated {
            push_section(
                &mut text,
                None,
                &format!(
                    "[only the first {MAX_LIST_ENTRIES} entries shown; list a subdirectory or use a smaller depth]"
                ),
            );
        }
        let result = ListFilesResult { sandbox_id: lease.id.clone(), path, entries, truncated };
        Ok(tool_result(&result, text, Vec::new(), false))
    }
}

/// The data as text, if it is text: valid UTF-8 without NUL bytes, allowing a
/// character cut at the end by the read limit.
fn text_prefix(data: &[u8]) -> Option<&str> {
    if data.contains(&0) {
        return None;
    }
    match std::str::from_utf8(data) {
        Ok(s) => Some(s),
        Err(e) if e.error_len().is_none() && data.len() - e.valid_up_to() < 4 => {
            std::str::from_utf8(&data[..e.valid_up_to()]).ok()
        }
        Err(_) => None,
    }
}
