//! seccomp from the spec's `linux.seccomp`, compiled with libseccomp (as
//! runc and Kata's agent do) and loaded by the setup helper.
//!
//! The agent compiles the profile once per container, when it validates the
//! spec ([`compile`]): libseccomp resolves syscall names for every listed
//! architecture and emits the BPF program, and a profile it cannot express
//! fails CreateContainer with INVALID_ARGUMENT naming the entry. The helper
//! only loads the finished program with seccomp(2) ([`Filter::load`]), so the
//! init process and every exec'd process get the same filter without a
//! second compilation. libseccomp is chosen over the pure-Rust seccompiler
//! because seccompiler gives one filter a single match action, while OCI
//! profiles mix actions (ALLOW, ERRNO with per-rule errno, KILL, TRACE...).
//!
//! Semantics follow runc: syscall names this libseccomp does not know are
//! skipped (profiles list syscalls of newer kernels); rules whose action is
//! the default action are skipped; `SCMP_ACT_ERRNO` without `errnoRet` is
//! EPERM; conditions on different arguments are ANDed, and a rule with two
//! conditions on the same argument becomes one rule per condition (ORed).

use std::fs::File;
use std::io::{Read, Seek};
use std::str::FromStr;

use kestrel_protocols::oci;
use libseccomp::{
    ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall,
};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use serde::{Deserialize, Serialize};

/// Why a profile cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The profile itself is wrong: an unknown action, architecture,
    /// operator or flag, an argument index past the sixth.
    #[error("{0}")]
    Invalid(String),
    /// A valid profile asks for something the agent does not offer.
    #[error("{0}")]
    Unsupported(String),
    /// libseccomp failed on a profile we had accepted.
    #[error("compiling the seccomp profile: {0}")]
    Compile(String),
}

/// The kernel's limit on a filter's length, in instructions.
const BPF_MAXINSNS: usize = 4096;

/// Size of one `struct sock_filter`.
const INSN_LEN: usize = 8;

/// Flags of seccomp(2)'s SECCOMP_SET_MODE_FILTER, by their OCI names.
const FLAGS: &[(&str, u32)] = &[
    ("SECCOMP_FILTER_FLAG_TSYNC", 1),
    ("SECCOMP_FILTER_FLAG_LOG", 2),
    ("SECCOMP_FILTER_FLAG_SPEC_ALLOW", 4),
];

/// A compiled filter, ready for the setup helper to load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    /// `struct sock_filter` instructions as libseccomp exported them.
    program: Vec<u8>,
    /// seccomp(2) flags from `linux.seccomp.flags`.
    flags: u32,
}

/// Compiles `linux.seccomp`.
pub fn compile(s: &oci::LinuxSeccomp) -> Result<Filter, SeccompError> {
    if s.DefaultAction.is_empty() {
        return Err(SeccompError::Invalid(
            "linux.seccomp.defaultAction is empty".into(),
        ));
    }
    let default = action(&s.DefaultAction, None, "linux.seccomp.defaultAction")?;
    let compile_err = |e: libseccomp::error::SeccompError| SeccompError::Compile(e.to_string());
    let mut ctx = ScmpFilterContext::new(default).map_err(compile_err)?;
    for name in s.Architectures.iter() {
        let arch = ScmpArch::from_str(name).map_err(|_| {
            SeccompError::Invalid(format!(
                "linux.seccomp.architectures: unknown architecture {name:?}"
            ))
        })?;
        if !ctx.is_arch_present(arch).map_err(compile_err)? {
            ctx.add_arch(arch).map_err(compile_err)?;
        }
    }
    for (i, sc) in s.Syscalls.iter().enumerate() {
        let field = format!("linux.seccomp.syscalls[{i}]");
        let errno = match &sc.ErrnoRet {
            Some(oci::linux_syscall::ErrnoRet::Errnoret(e)) => Some(*e),
            // The oneof has no other member today; protobuf keeps it open.
            _ => None,
        };
        let act = action(&sc.Action, errno, &format!("{field}.action"))?;
        let conditions = sc
            .Args
            .iter()
            .enumerate()
            .map(|(j, a)| condition(a, &format!("{field}.args[{j}]")))
            .collect::<Result<Vec<_>, _>>()?;
        if act == default {
            // libseccomp refuses a rule that only repeats the default.
            continue;
        }
        let mut indexes: Vec<u32> = sc.Args.iter().map(|a| a.Index as u32).collect();
        indexes.sort_unstable();
        let repeated_index = indexes.windows(2).any(|w| w[0] == w[1]);
        for name in sc.Names.iter() {
            let Ok(syscall) = ScmpSyscall::from_name(name) else {
                // Unknown to this libseccomp: a syscall of a newer kernel,
                // which this guest's kernel does not have either.
                tracing::debug!(syscall = %name, "seccomp: unknown syscall, rule skipped");
                continue;
            };
            let added = if repeated_index {
                conditions
                    .iter()
                    .try_for_each(|c| ctx.add_rule_conditional(act, syscall, &[*c]).map(drop))
            } else {
                ctx.add_rule_conditional(act, syscall, &conditions)
                    .map(drop)
            };
            added.map_err(|e| {
                SeccompError::Invalid(format!("{field}: rule for syscall {name}: {e}"))
            })?;
        }
    }
    let mut flags = 0;
    for name in s.Flags.iter() {
        let (_, bit) = FLAGS.iter().find(|(n, _)| n == name).ok_or_else(|| {
            SeccompError::Invalid(format!("linux.seccomp.flags: unknown flag {name:?}"))
        })?;
        flags |= bit;
    }
    let program = export(&ctx)?;
    if program.len() / INSN_LEN > BPF_MAXINSNS {
        return Err(SeccompError::Invalid(format!(
            "linux.seccomp compiles to {} BPF instructions, more than the kernel's limit of {BPF_MAXINSNS}",
            program.len() / INSN_LEN
        )));
    }
    Ok(Filter { program, flags })
}

/// The program as bytes. libseccomp 2.5 (Debian 12) can only write it to a
/// file descriptor; an anonymous memory file keeps it off any filesystem.
fn export(ctx: &ScmpFilterContext) -> Result<Vec<u8>, SeccompError> {
    let io = |what: &str, e: &dyn std::fmt::Display| SeccompError::Compile(format!("{what}: {e}"));
    let fd = memfd_create(c"kestrel-seccomp", MemFdCreateFlag::MFD_CLOEXEC)
        .map_err(|e| io("memfd_create", &e))?;
    let mut file = File::from(fd);
    ctx.export_bpf(&file).map_err(|e| io("exporting BPF", &e))?;
    file.rewind().map_err(|e| io("rewinding", &e))?;
    let mut program = Vec::new();
    file.read_to_end(&mut program)
        .map_err(|e| io("reading BPF", &e))?;
    if program.is_empty() || program.len() % INSN_LEN != 0 {
        return Err(SeccompError::Compile(format!(
            "libseccomp wrote {} bytes, not whole instructions",
            program.len()
        )));
    }
    Ok(program)
}

fn action(name: &str, errno: Option<u32>, field: &str) -> Result<ScmpAction, SeccompError> {
    let errno = match errno.map(i32::try_from) {
        Some(Ok(e)) => e,
        Some(Err(_)) => {
            return Err(SeccompError::Invalid(format!(
                "{field}: errnoRet does not fit in an errno"
            )))
        }
        None => libc::EPERM,
    };
    Ok(match name {
        "SCMP_ACT_ALLOW" => ScmpAction::Allow,
        "SCMP_ACT_ERRNO" => ScmpAction::Errno(errno),
        "SCMP_ACT_TRACE" => ScmpAction::Trace(errno as u16),
        "SCMP_ACT_TRAP" => ScmpAction::Trap,
        "SCMP_ACT_LOG" => ScmpAction::Log,
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => ScmpAction::KillThread,
        "SCMP_ACT_KILL_PROCESS" => ScmpAction::KillProcess,
        "SCMP_ACT_NOTIFY" => {
            return Err(SeccompError::Unsupported(format!(
                "{field}: SCMP_ACT_NOTIFY needs a seccomp listener (listenerPath), \
                 which the agent does not support"
            )))
        }
        other => {
            return Err(SeccompError::Invalid(format!(
                "{field}: unknown seccomp action {other:?}"
            )))
        }
    })
}

fn condition(a: &oci::LinuxSeccompArg, field: &str) -> Result<ScmpArgCompare, SeccompError> {
    if a.Index > 5 {
        return Err(SeccompError::Invalid(format!(
            "{field}.index {} is past a syscall's six arguments",
            a.Index
        )));
    }
    let op = match a.Op.as_str() {
        // OCI's value is the mask and valueTwo the value to compare with.
        "SCMP_CMP_MASKED_EQ" => ScmpCompareOp::MaskedEqual(a.Value),
        other => ScmpCompareOp::from_str(other).map_err(|_| {
            SeccompError::Invalid(format!("{field}.op: unknown operator {other:?}"))
        })?,
    };
    let datum = match op {
        ScmpCompareOp::MaskedEqual(_) => a.ValueTwo,
        _ => a.Value,
    };
    Ok(ScmpArgCompare::new(a.Index as u32, op, datum))
}

impl Filter {
    /// Installs the filter on the calling thread (the setup helper is
    /// single-threaded). Without no_new_privs the kernel asks for
    /// CAP_SYS_ADMIN, which the caller must still have.
    pub fn load(&self) -> Result<(), String> {
        let mut insns: Vec<libc::sock_filter> = self
            .program
            .chunks_exact(INSN_LEN)
            .map(|i| libc::sock_filter {
                code: u16::from_ne_bytes([i[0], i[1]]),
                jt: i[2],
                jf: i[3],
                k: u32::from_ne_bytes([i[4], i[5], i[6], i[7]]),
            })
            .collect();
        let prog = libc::sock_fprog {
            // compile() kept the length within BPF_MAXINSNS.
            len: insns.len() as u16,
            filter: insns.as_mut_ptr(),
        };
        // SAFETY: `prog` points at `insns`, which outlives the call; the
        // kernel copies the program before returning.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                self.flags,
                &prog as *const libc::sock_fprog,
            )
        };
        if rc != 0 {
            return Err(format!(
                "loading the seccomp filter: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }
}

/// Whether this kernel can filter syscalls (CONFIG_SECCOMP_FILTER): asks
/// seccomp(2) whether it knows the ALLOW action.
pub fn supported() -> bool {
    let allow: u32 = libc::SECCOMP_RET_ALLOW;
    // SAFETY: SECCOMP_GET_ACTION_AVAIL reads one u32 from the pointer.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_GET_ACTION_AVAIL,
            0,
            &allow as *const u32,
        )
    };
    rc == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(names: &[&str], action: &str, errno: Option<u32>) -> oci::LinuxSyscall {
        oci::LinuxSyscall {
            Names: names.iter().map(|n| n.to_string()).collect(),
            Action: action.into(),
            ErrnoRet: errno.map(oci::linux_syscall::ErrnoRet::Errnoret),
            ..Default::default()
        }
    }

    fn profile(default: &str, rules: Vec<oci::LinuxSyscall>) -> oci::LinuxSeccomp {
        oci::LinuxSeccomp {
            DefaultAction: default.into(),
            Architectures: vec!["SCMP_ARCH_X86_64".into(), "SCMP_ARCH_X86".into()],
            Syscalls: rules,
            ..Default::default()
        }
    }

    fn arg(index: u64, value: u64, value_two: u64, op: &str) -> oci::LinuxSeccompArg {
        oci::LinuxSeccompArg {
            Index: index,
            Value: value,
            ValueTwo: value_two,
            Op: op.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_profile_with_every_action_and_operator_compiles() {
        let mut conditional = rule(&["personality"], "SCMP_ACT_ALLOW", None);
        conditional.Args = vec![arg(0, 8, 0, "SCMP_CMP_EQ")];
        let mut masked = rule(&["clone"], "SCMP_ACT_ALLOW", None);
        masked.Args = vec![arg(0, 0x7e020000, 0, "SCMP_CMP_MASKED_EQ")];
        let mut same_arg = rule(&["socket"], "SCMP_ACT_ALLOW", None);
        same_arg.Args = vec![arg(0, 1, 0, "SCMP_CMP_EQ"), arg(0, 2, 0, "SCMP_CMP_EQ")];
        let mut profile = profile(
            "SCMP_ACT_ERRNO",
            vec![
                rule(
                    &["read", "write", "no_such_syscall"],
                    "SCMP_ACT_ALLOW",
                    None,
                ),
                rule(&["mkdir"], "SCMP_ACT_ERRNO", Some(libc::ENOSYS as u32)),
                rule(&["ptrace"], "SCMP_ACT_KILL_PROCESS", None),
                rule(&["reboot"], "SCMP_ACT_KILL", None),
                rule(&["acct"], "SCMP_ACT_TRAP", None),
                rule(&["getpid"], "SCMP_ACT_LOG", None),
                rule(&["uname"], "SCMP_ACT_TRACE", Some(1)),
                conditional,
                masked,
                same_arg,
            ],
        );
        profile.Flags = vec!["SECCOMP_FILTER_FLAG_LOG".into()];
        let filter = compile(&profile).unwrap();
        assert_eq!(filter.flags, 2);
        assert_eq!(filter.program.len() % INSN_LEN, 0);
    }

    #[test]
    fn a_rule_repeating_the_default_action_is_skipped() {
        let p = profile(
            "SCMP_ACT_ALLOW",
            vec![rule(&["read"], "SCMP_ACT_ALLOW", None)],
        );
        assert!(compile(&p).is_ok());
    }

    #[test]
    fn an_unknown_action_is_invalid_naming_the_rule() {
        let p = profile(
            "SCMP_ACT_ALLOW",
            vec![rule(&["mkdir"], "SCMP_ACT_MAYBE", None)],
        );
        let err = compile(&p).unwrap_err();
        assert!(matches!(err, SeccompError::Invalid(_)));
        assert_eq!(
            err.to_string(),
            "linux.seccomp.syscalls[0].action: unknown seccomp action \"SCMP_ACT_MAYBE\""
        );
    }

    #[test]
    fn an_empty_default_action_is_invalid() {
        let err = compile(&profile("", vec![])).unwrap_err();
        assert!(err.to_string().contains("defaultAction"), "{err}");
    }

    #[test]
    fn an_unknown_architecture_operator_or_flag_is_invalid() {
        let mut p = profile("SCMP_ACT_ALLOW", vec![]);
        p.Architectures.push("SCMP_ARCH_Z80".into());
        assert!(compile(&p)
            .unwrap_err()
            .to_string()
            .contains("SCMP_ARCH_Z80"));

        let mut r = rule(&["mkdir"], "SCMP_ACT_ERRNO", None);
        r.Args = vec![arg(0, 1, 0, "SCMP_CMP_ALMOST")];
        let err = compile(&profile("SCMP_ACT_ALLOW", vec![r])).unwrap_err();
        assert!(err.to_string().contains("args[0].op"), "{err}");

        let mut r = rule(&["mkdir"], "SCMP_ACT_ERRNO", None);
        r.Args = vec![arg(6, 1, 0, "SCMP_CMP_EQ")];
        let err = compile(&profile("SCMP_ACT_ALLOW", vec![r])).unwrap_err();
        assert!(err.to_string().contains("args[0].index 6"), "{err}");

        let mut p = profile("SCMP_ACT_ALLOW", vec![]);
        p.Flags = vec!["SECCOMP_FILTER_FLAG_NEW".into()];
        assert!(compile(&p).unwrap_err().to_string().contains("flags"));
    }

    #[test]
    fn notify_is_unsupported() {
        let p = profile(
            "SCMP_ACT_ALLOW",
            vec![rule(&["mkdir"], "SCMP_ACT_NOTIFY", None)],
        );
        assert!(matches!(compile(&p), Err(SeccompError::Unsupported(_))));
    }
}
