//! Just enough ELF reading to tell a static binary from a dynamic one: a dynamic executable
//! has a PT_INTERP program header naming its loader.

use std::io::Read;
use std::path::Path;

const PT_INTERP: u32 = 3;

pub fn is_static(path: &Path) -> std::io::Result<bool> {
    let mut f = std::fs::File::open(path)?;
    let mut head = vec![0u8; 64];
    f.read_exact(&mut head)?;
    if &head[..4] != b"\x7fELF" || head[4] != 2 || head[5] != 1 {
        // Not a 64-bit little-endian ELF: not something the agent can be.
        return Ok(false);
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let phoff = u64::from_le_bytes(head[32..40].try_into().unwrap_or([0; 8])) as usize;
    let phentsize = u16_at(&head, 54) as usize;
    let phnum = u16_at(&head, 56) as usize;
    if phentsize < 4 || phnum > 1024 {
        return Ok(false);
    }
    let mut all = Vec::new();
    f = std::fs::File::open(path)?;
    f.take((phoff + phentsize * phnum) as u64)
        .read_to_end(&mut all)?;
    if all.len() < phoff + phentsize * phnum {
        return Ok(false);
    }
    Ok((0..phnum).all(|i| u32_at(&all, phoff + i * phentsize) != PT_INTERP))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_test_binary_itself_is_dynamic() {
        // Test binaries are linked against glibc dynamically.
        let exe = std::env::current_exe().unwrap();
        assert!(!super::is_static(&exe).unwrap());
    }

    #[test]
    fn a_text_file_is_not_static() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x");
        std::fs::write(&p, vec![b'a'; 100]).unwrap();
        assert!(!super::is_static(&p).unwrap());
    }
}
