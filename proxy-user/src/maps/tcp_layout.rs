//! Where the splice program finds a socket's reading position: the offset of
//! `copied_seq` in the running kernel's `struct tcp_sock`, from its BTF. aya's Rust
//! programs get no CO-RE relocations, so the offset is looked up here and handed to the
//! program as a global set at load.

use btf_rs::{Backend, Btf, Type};

/// The kernel's own BTF.
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The byte offset of `copied_seq` in `struct tcp_sock`, or why it is unknown.
pub fn copied_seq_offset() -> Result<u32, String> {
    // Mapped, not parsed whole: parsing takes tens of MB of heap that the allocator
    // would keep long after the one lookup.
    let btf = Btf::from_file_with_backend(VMLINUX_BTF, Backend::Mmap)
        .map_err(|e| format!("reading {VMLINUX_BTF}: {e}"))?;
    member_offset(&btf, "tcp_sock", "copied_seq")
}

/// The byte offset of the member `field` of `struct name`, a direct member that is
/// not a bitfield.
fn member_offset(btf: &Btf, name: &str, field: &str) -> Result<u32, String> {
    let types = btf
        .resolve_types_by_name(name)
        .map_err(|e| format!("struct {name}: {e}"))?;
    let Some(Type::Struct(layout)) = types.into_iter().find(|t| matches!(t, Type::Struct(_)))
    else {
        return Err(format!("no struct {name} in the kernel's BTF"));
    };
    let member = layout
        .members
        .iter()
        .find(|m| btf.resolve_name(*m).is_ok_and(|n| n == field))
        .ok_or_else(|| format!("struct {name} has no member {field}"))?;
    let bits = member.bit_offset();
    if member.bitfield_size().is_some_and(|size| size != 0) || bits % 8 != 0 {
        return Err(format!("{name}.{field} is a bitfield"));
    }
    Ok(bits / 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checked against this kernel's BTF where it has one: `copied_seq` sits after
    /// the socket's common part and the TCP header prediction fields, never at 0.
    #[test]
    fn finds_copied_seq_in_the_running_kernel() {
        if !std::path::Path::new(VMLINUX_BTF).exists() {
            eprintln!("skipped: this kernel has no {VMLINUX_BTF}");
            return;
        }
        let offset = copied_seq_offset().expect("copied_seq in tcp_sock");
        let btf = Btf::from_file(VMLINUX_BTF).unwrap();
        let rcv_nxt = member_offset(&btf, "tcp_sock", "rcv_nxt").unwrap();
        assert!(offset > 0 && offset.is_multiple_of(4), "offset {offset}");
        assert_ne!(offset, rcv_nxt);
        assert!(member_offset(&btf, "tcp_sock", "no_such_member").is_err());
        assert!(member_offset(&btf, "no_such_struct_kgate", "copied_seq").is_err());
    }
}
