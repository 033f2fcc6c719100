//! The size of the VM our guest boots in. The host's `[vm]` configuration,
//! the launchers and kestrel-vmm all describe a guest's memory and vCPUs
//! with this one type, and its limits and defaults are written only here.

/// A guest VM's memory and vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmShape {
    pub memory_mib: u32,
    pub vcpus: u8,
}

impl VmShape {
    /// The smallest guest memory our kernel and initramfs boot in.
    pub const MIN_MEMORY_MIB: u32 = 64;
    /// The most vCPUs a guest is given.
    pub const MAX_VCPUS: u8 = 32;

    /// Checks the shape against [`Self::MIN_MEMORY_MIB`] and
    /// [`Self::MAX_VCPUS`].
    pub fn check(&self) -> Result<(), ShapeError> {
        if self.memory_mib < Self::MIN_MEMORY_MIB {
            return Err(ShapeError::MemoryTooSmall(self.memory_mib));
        }
        if !(1..=Self::MAX_VCPUS).contains(&self.vcpus) {
            return Err(ShapeError::Vcpus(self.vcpus));
        }
        Ok(())
    }
}

impl Default for VmShape {
    /// Kata's default guest: 256 MiB would be small for Kata's image, but
    /// ours is an agent and busybox-sized containers; one vCPU.
    fn default() -> Self {
        VmShape {
            memory_mib: 256,
            vcpus: 1,
        }
    }
}

/// Why a shape was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    #[error("{0} MiB is too little for the guest; at least {min}", min = VmShape::MIN_MEMORY_MIB)]
    MemoryTooSmall(u32),
    #[error("{0} is not between 1 and {max}", max = VmShape::MAX_VCPUS)]
    Vcpus(u8),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_shape_is_valid_and_the_limits_are_refused() {
        VmShape::default().check().unwrap();
        let small = VmShape {
            memory_mib: 32,
            ..VmShape::default()
        };
        assert_eq!(small.check(), Err(ShapeError::MemoryTooSmall(32)));
        for vcpus in [0, 33] {
            let shape = VmShape {
                vcpus,
                ..VmShape::default()
            };
            assert_eq!(shape.check(), Err(ShapeError::Vcpus(vcpus)));
        }
    }
}
