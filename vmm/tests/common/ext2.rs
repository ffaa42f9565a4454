//! A minimal ext2 image written in Rust, so a Linux test guest can boot from a disk without
//! any host tool: a root directory holding an empty `/dev` (the kernel mounts devtmpfs there,
//! which gives init its `/dev/console`) and the executable `/init`. The project's guest kernel
//! has no initramfs support (`CONFIG_BLK_DEV_INITRD` is off), so a root disk stands in for one.
//!
//! Layout, 1 KiB blocks, one block group: 0 boot block, 1 superblock, 2 group descriptors,
//! 3 block bitmap, 4 inode bitmap, 5-6 inode table (16 inodes of 128 bytes), 7 `/`, 8 `/dev`,
//! 9.. the bytes of `/init` (at most 12 direct blocks).

const BLOCK_BYTES: usize = 1024;
/// Blocks in the filesystem (256 KiB).
const BLOCKS: usize = 256;
const INODES: usize = 16;
const INODE_BYTES: usize = 128;
const BLOCKS_PER_GROUP: usize = 8192;
const SUPERBLOCK: usize = 1;
const GROUP_DESCRIPTORS: usize = 2;
const BLOCK_BITMAP: usize = 3;
const INODE_BITMAP: usize = 4;
const INODE_TABLE: usize = 5;
const INODE_TABLE_BLOCKS: usize = INODES * INODE_BYTES / BLOCK_BYTES;
const ROOT_DIR_BLOCK: usize = INODE_TABLE + INODE_TABLE_BLOCKS;
const DEV_DIR_BLOCK: usize = ROOT_DIR_BLOCK + 1;
const FIRST_FILE_BLOCK: usize = DEV_DIR_BLOCK + 1;
const ROOT_INODE: u32 = 2;
/// First inode that is not reserved (ext2 revision 1).
const DEV_INODE: u32 = 11;
const INIT_INODE: u32 = 12;
const MAX_DIRECT_BLOCKS: usize = 12;
const EXT2_MAGIC: u16 = 0xef53;
const FEATURE_INCOMPAT_FILETYPE: u32 = 0x2;
const S_IFDIR: u16 = 0o040000;
const S_IFREG: u16 = 0o100000;
const FT_REG_FILE: u8 = 1;
const FT_DIR: u8 = 2;

fn put16(buf: &mut [u8], at: usize, v: u16) {
    buf[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Sets bits `0..used` and `valid..BLOCK_BYTES * 8` (past the end of what the bitmap covers).
fn bitmap(used: usize, valid: usize) -> Vec<u8> {
    let mut bits = vec![0u8; BLOCK_BYTES];
    for i in (0..used).chain(valid..BLOCK_BYTES * 8) {
        bits[i / 8] |= 1 << (i % 8);
    }
    bits
}

/// One directory block: `entries` as (inode, name, file type), the last one spanning the rest.
fn dir_block(entries: &[(u32, &str, u8)]) -> Vec<u8> {
    let mut block = vec![0u8; BLOCK_BYTES];
    let mut at = 0;
    for (i, (inode, name, file_type)) in entries.iter().enumerate() {
        let len = (8 + name.len()).next_multiple_of(4);
        let rec_len = if i + 1 == entries.len() { BLOCK_BYTES - at } else { len };
        put32(&mut block, at, *inode);
        put16(&mut block, at + 4, rec_len as u16);
        block[at + 6] = name.len() as u8;
        block[at + 7] = *file_type;
        block[at + 8..at + 8 + name.len()].copy_from_slice(name.as_bytes());
        at += rec_len;
    }
    block
}

/// Writes inode `number` into the image.
fn inode(image: &mut [u8], number: u32, mode: u16, links: u16, size: usize, blocks: &[usize]) {
    let at = INODE_TABLE * BLOCK_BYTES + (number as usize - 1) * INODE_BYTES;
    let i = &mut image[at..at + INODE_BYTES];
    put16(i, 0, mode);
    put32(i, 4, size as u32);
    put16(i, 26, links);
    put32(i, 28, (blocks.len() * BLOCK_BYTES / 512) as u32);
    for (n, block) in blocks.iter().enumerate() {
        put32(i, 40 + 4 * n, *block as u32);
    }
}

/// An ext2 image whose `/init` holds `init` (mode 0755) and whose `/dev` is empty.
pub fn image_with_init(init: &[u8]) -> Vec<u8> {
    let file_blocks = init.len().div_ceil(BLOCK_BYTES).max(1);
    assert!(file_blocks <= MAX_DIRECT_BLOCKS, "/init of {} bytes needs indirect blocks", init.len());
    let used_blocks = FIRST_FILE_BLOCK + file_blocks; // blocks 0..used_blocks
    let used_inodes = INIT_INODE as usize;
    let mut image = vec![0u8; BLOCKS * BLOCK_BYTES];

    let sb = &mut image[SUPERBLOCK * BLOCK_BYTES..(SUPERBLOCK + 1) * BLOCK_BYTES];
    put32(sb, 0, INODES as u32);
    put32(sb, 4, BLOCKS as u32);
    put32(sb, 12, (BLOCKS - used_blocks) as u32);
    put32(sb, 16, (INODES - used_inodes) as u32);
    put32(sb, 20, SUPERBLOCK as u32); // first data block: 1 with 1 KiB blocks
    put32(sb, 32, BLOCKS_PER_GROUP as u32);
    put32(sb, 36, BLOCKS_PER_GROUP as u32);
    put32(sb, 40, INODES as u32);
    put16(sb, 54, u16::MAX); // no forced checks
    put16(sb, 56, EXT2_MAGIC);
    put16(sb, 58, 1); // cleanly unmounted
    put16(sb, 60, 1); // on errors: continue
    put32(sb, 76, 1); // revision 1: first_ino and inode_size below
    put32(sb, 84, DEV_INODE);
    put16(sb, 88, INODE_BYTES as u16);
    put32(sb, 96, FEATURE_INCOMPAT_FILETYPE);
    sb[120..136].copy_from_slice(b"capsule-test\0\0\0\0");

    let gd = &mut image[GROUP_DESCRIPTORS * BLOCK_BYTES..];
    put32(gd, 0, BLOCK_BITMAP as u32);
    put32(gd, 4, INODE_BITMAP as u32);
    put32(gd, 8, INODE_TABLE as u32);
    put16(gd, 12, (BLOCKS - used_blocks) as u16);
    put16(gd, 14, (INODES - used_inodes) as u16);
    put16(gd, 16, 2); // directories: / and /dev

    // Bit n of the block bitmap is block n + 1 (the first data block).
    let blocks = bitmap(used_blocks - SUPERBLOCK, BLOCKS - SUPERBLOCK);
    image[BLOCK_BITMAP * BLOCK_BYTES..][..BLOCK_BYTES].copy_from_slice(&blocks);
    let inodes = bitmap(used_inodes, INODES);
    image[INODE_BITMAP * BLOCK_BYTES..][..BLOCK_BYTES].copy_from_slice(&inodes);

    let root = dir_block(&[
        (ROOT_INODE, ".", FT_DIR),
        (ROOT_INODE, "..", FT_DIR),
        (DEV_INODE, "dev", FT_DIR),
        (INIT_INODE, "init", FT_REG_FILE),
    ]);
    image[ROOT_DIR_BLOCK * BLOCK_BYTES..][..BLOCK_BYTES].copy_from_slice(&root);
    let dev = dir_block(&[(DEV_INODE, ".", FT_DIR), (ROOT_INODE, "..", FT_DIR)]);
    image[DEV_DIR_BLOCK * BLOCK_BYTES..][..BLOCK_BYTES].copy_from_slice(&dev);
    image[FIRST_FILE_BLOCK * BLOCK_BYTES..][..init.len()].copy_from_slice(init);

    inode(&mut image, ROOT_INODE, S_IFDIR | 0o755, 3, BLOCK_BYTES, &[ROOT_DIR_BLOCK]);
    inode(&mut image, DEV_INODE, S_IFDIR | 0o755, 2, BLOCK_BYTES, &[DEV_DIR_BLOCK]);
    let file: Vec<usize> = (FIRST_FILE_BLOCK..FIRST_FILE_BLOCK + file_blocks).collect();
    inode(&mut image, INIT_INODE, S_IFREG | 0o755, 1, init.len(), &file);
    image
}
