//! The parts of the NVMe 1.4 specification the backend speaks: controller registers
//! (section 3.1), the submission and completion entries (4.2, 4.6), and the admin and NVM
//! commands it sends, each built by one function so that every field's bits are written
//! down once. Pure data: nothing here touches a device.

/// Controller Capabilities (CAP), offset 0x00.
pub const REG_CAP: usize = 0x00;
/// Version (VS), offset 0x08.
pub const REG_VS: usize = 0x08;
/// Controller Configuration (CC), offset 0x14.
pub const REG_CC: usize = 0x14;
/// Controller Status (CSTS), offset 0x1c.
pub const REG_CSTS: usize = 0x1c;
/// Admin Queue Attributes (AQA), offset 0x24.
pub const REG_AQA: usize = 0x24;
/// Admin Submission Queue base (ASQ), offset 0x28.
pub const REG_ASQ: usize = 0x28;
/// Admin Completion Queue base (ACQ), offset 0x30.
pub const REG_ACQ: usize = 0x30;
/// First doorbell (admin submission queue tail), offset 0x1000.
pub const DOORBELLS: usize = 0x1000;

/// The memory page size the backend configures (CC.MPS = 0): 4 KiB, which every
/// controller supports (CAP.MPSMIN = 0 is checked at start).
pub const PAGE: usize = 4096;
/// Bytes of a submission queue entry (CC.IOSQES = 6).
pub const SQE_BYTES: usize = 64;
/// Bytes of a completion queue entry (CC.IOCQES = 4).
pub const CQE_BYTES: usize = 16;

/// CSTS.RDY: the controller is ready (or, after CC.EN = 0, not yet reset).
pub const CSTS_RDY: u32 = 1;
/// CSTS.CFS: Controller Fatal Status.
pub const CSTS_CFS: u32 = 1 << 1;

/// The fields of CAP the backend uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap {
    /// Most entries a queue may have (MQES + 1).
    pub max_queue_entries: u32,
    /// Worst-case time for CSTS.RDY to follow CC.EN, in milliseconds (TO x 500).
    pub timeout_ms: u64,
    /// Doorbell stride in bytes (4 << DSTRD).
    pub doorbell_stride: usize,
    /// The NVM command set is supported (CSS bit 0).
    pub nvm_command_set: bool,
    /// Smallest memory page size, bytes (2 ^ (12 + MPSMIN)).
    pub min_page: usize,
}

impl Cap {
    /// Decodes the CAP register.
    pub fn parse(cap: u64) -> Cap {
        Cap {
            max_queue_entries: (cap & 0xffff) as u32 + 1,
            timeout_ms: ((cap >> 24) & 0xff) * 500,
            doorbell_stride: 4 << ((cap >> 32) & 0xf),
            nvm_command_set: (cap >> 37) & 1 == 1,
            min_page: 1 << (12 + ((cap >> 48) & 0xf)),
        }
    }

    /// Offset of queue `qid`'s submission tail doorbell.
    pub fn sq_doorbell(&self, qid: u16) -> usize {
        DOORBELLS + 2 * usize::from(qid) * self.doorbell_stride
    }

    /// Offset of queue `qid`'s completion head doorbell.
    pub fn cq_doorbell(&self, qid: u16) -> usize {
        DOORBELLS + (2 * usize::from(qid) + 1) * self.doorbell_stride
    }
}

/// CC for an enabled controller: NVM command set, 4 KiB pages, round-robin arbitration,
/// 64-byte submission and 16-byte completion entries.
pub const CC_ENABLE: u32 = 1 | (6 << 16) | (4 << 20);

/// AQA for admin queues of `entries` entries each.
pub fn aqa(entries: u32) -> u32 {
    let n = entries - 1;
    n | (n << 16)
}

/// Admin command opcodes.
pub mod admin {
    /// Delete I/O Submission Queue.
    pub const DELETE_SQ: u8 = 0x00;
    /// Create I/O Submission Queue.
    pub const CREATE_SQ: u8 = 0x01;
    /// Delete I/O Completion Queue.
    pub const DELETE_CQ: u8 = 0x04;
    /// Create I/O Completion Queue.
    pub const CREATE_CQ: u8 = 0x05;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
}

/// NVM command opcodes.
pub mod nvm {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset Management (deallocate: discard).
    pub const DSM: u8 = 0x09;
}

/// A submission queue entry, as 16 little-endian dwords.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Command(pub [u32; 16]);

impl Command {
    /// A command with `opcode` for namespace `nsid`; its CID is set at submission.
    pub fn new(opcode: u8, nsid: u32) -> Command {
        let mut c = Command::default();
        c.0[0] = u32::from(opcode);
        c.0[1] = nsid;
        c
    }

    /// Sets the command identifier (CDW0 bits 31:16).
    pub fn set_cid(&mut self, cid: u16) {
        self.0[0] = (self.0[0] & 0xffff) | (u32::from(cid) << 16);
    }

    /// The data pointer: PRP entry 1 and 2.
    pub fn prps(mut self, prp1: u64, prp2: u64) -> Command {
        self.0[6] = prp1 as u32;
        self.0[7] = (prp1 >> 32) as u32;
        self.0[8] = prp2 as u32;
        self.0[9] = (prp2 >> 32) as u32;
        self
    }

    /// Command dword `n` (10 to 15).
    pub fn cdw(mut self, n: usize, value: u32) -> Command {
        self.0[n] = value;
        self
    }

    /// Read or Write of `blocks` blocks (1 to 65536) at `lba`.
    pub fn rw(opcode: u8, nsid: u32, lba: u64, blocks: u32) -> Command {
        Command::new(opcode, nsid)
            .cdw(10, lba as u32)
            .cdw(11, (lba >> 32) as u32)
            .cdw(12, blocks - 1)
    }

    /// Write Zeroes of `blocks` blocks (1 to 65536) at `lba`; `deallocate` lets the
    /// controller unmap them (DEAC).
    pub fn write_zeroes(nsid: u32, lba: u64, blocks: u32, deallocate: bool) -> Command {
        let mut c = Command::rw(nvm::WRITE_ZEROES, nsid, lba, blocks);
        if deallocate {
            c.0[12] |= 1 << 25;
        }
        c
    }

    /// Dataset Management, deallocate, of `ranges` ranges listed at the data pointer.
    pub fn deallocate(nsid: u32, ranges: u32) -> Command {
        Command::new(nvm::DSM, nsid)
            .cdw(10, ranges - 1)
            .cdw(11, 1 << 2)
    }

    /// Identify: `cns` 1 (controller) or 0 (namespace `nsid`), into the 4 KiB page at
    /// `page`.
    pub fn identify(cns: u32, nsid: u32, page: u64) -> Command {
        Command::new(admin::IDENTIFY, nsid)
            .prps(page, 0)
            .cdw(10, cns)
    }

    /// Set Features, Number of Queues: asks for `n` I/O submission and completion queues.
    pub fn set_queue_count(n: u16) -> Command {
        let m = u32::from(n) - 1;
        Command::new(admin::SET_FEATURES, 0)
            .cdw(10, 0x07)
            .cdw(11, m | (m << 16))
    }

    /// Create I/O Completion Queue `qid` of `entries` entries at `base`, interrupting
    /// on MSI-X vector `vector`.
    pub fn create_cq(qid: u16, entries: u32, base: u64, vector: u16) -> Command {
        Command::new(admin::CREATE_CQ, 0)
            .prps(base, 0)
            .cdw(10, u32::from(qid) | ((entries - 1) << 16))
            .cdw(11, 1 | (1 << 1) | (u32::from(vector) << 16))
    }

    /// Create I/O Submission Queue `qid` of `entries` entries at `base`, completing on
    /// completion queue `qid`.
    pub fn create_sq(qid: u16, entries: u32, base: u64) -> Command {
        Command::new(admin::CREATE_SQ, 0)
            .prps(base, 0)
            .cdw(10, u32::from(qid) | ((entries - 1) << 16))
            .cdw(11, 1 | (u32::from(qid) << 16))
    }

    /// Delete I/O Submission (`admin::DELETE_SQ`) or Completion Queue `qid`.
    pub fn delete_queue(opcode: u8, qid: u16) -> Command {
        Command::new(opcode, 0).cdw(10, u32::from(qid))
    }
}

/// A completion queue entry, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Command-specific result (DW0).
    pub result: u32,
    /// The submission queue head the controller has consumed up to.
    pub sq_head: u16,
    /// The command it completes.
    pub cid: u16,
    /// The phase tag: flips each time the controller wraps the queue.
    pub phase: bool,
    /// Status code type and status code (0: success).
    pub status: u16,
}

impl Completion {
    /// Decodes the four dwords of an entry.
    pub fn parse(dw: [u32; 4]) -> Completion {
        Completion {
            result: dw[0],
            sq_head: dw[2] as u16,
            cid: dw[3] as u16,
            phase: (dw[3] >> 16) & 1 == 1,
            // SC (bits 24:17) and SCT (27:25), without CRD/More/DNR.
            status: ((dw[3] >> 17) & 0x7ff) as u16,
        }
    }
}

/// What Identify Controller says that the backend uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdentifyController {
    /// Largest transfer in units of the minimum page size, as a power of two (0: none).
    pub mdts: u8,
    /// Number of namespaces.
    pub namespaces: u32,
    /// Dataset Management is supported (ONCS bit 2).
    pub dsm: bool,
    /// Write Zeroes is supported (ONCS bit 3).
    pub write_zeroes: bool,
    /// A volatile write cache is present (VWC bit 0): FLUSH reaches the device.
    pub volatile_write_cache: bool,
}

impl IdentifyController {
    /// Decodes the 4 KiB Identify Controller page.
    pub fn parse(page: &[u8; PAGE]) -> IdentifyController {
        let oncs = u16::from_le_bytes([page[520], page[521]]);
        IdentifyController {
            mdts: page[77],
            namespaces: u32::from_le_bytes([page[516], page[517], page[518], page[519]]),
            dsm: oncs & (1 << 2) != 0,
            write_zeroes: oncs & (1 << 3) != 0,
            volatile_write_cache: page[525] & 1 == 1,
        }
    }
}

/// What Identify Namespace says that the backend uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdentifyNamespace {
    /// Size in logical blocks (NSZE).
    pub blocks: u64,
    /// Logical block size in bytes, of the format in use (FLBAS).
    pub block_size: u32,
}

impl IdentifyNamespace {
    /// Decodes the 4 KiB Identify Namespace page; `None` for an unusable format (a block
    /// size outside 512 B to 64 KiB, or metadata interleaved with the data).
    pub fn parse(page: &[u8; PAGE]) -> Option<IdentifyNamespace> {
        let blocks = u64::from_le_bytes(page[0..8].try_into().ok()?);
        let format = usize::from(page[26] & 0xf);
        let at = 128 + 4 * format;
        let lbaf = u32::from_le_bytes(page[at..at + 4].try_into().ok()?);
        let metadata = lbaf & 0xffff;
        let lbads = (lbaf >> 16) & 0xff;
        if metadata != 0 || !(9..=16).contains(&lbads) {
            return None;
        }
        Some(IdentifyNamespace {
            blocks,
            block_size: 1 << lbads,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_fields_decode_as_the_spec_lays_them_out() {
        // MQES 2047, CQR, TO 15 (7.5 s), DSTRD 0, CSS NVM, MPSMIN 0, MPSMAX 4.
        let cap = 0x7ff | (1 << 16) | (15 << 24) | (1u64 << 37) | (4u64 << 52);
        let c = Cap::parse(cap);
        assert_eq!(c.max_queue_entries, 2048);
        assert_eq!(c.timeout_ms, 7500);
        assert_eq!(c.doorbell_stride, 4);
        assert!(c.nvm_command_set);
        assert_eq!(c.min_page, 4096);
        assert_eq!((c.sq_doorbell(0), c.cq_doorbell(0)), (0x1000, 0x1004));
        assert_eq!((c.sq_doorbell(3), c.cq_doorbell(3)), (0x1018, 0x101c));
        let wide = Cap::parse(cap | (2u64 << 32));
        assert_eq!(wide.cq_doorbell(1), 0x1000 + 3 * 16);
    }

    #[test]
    fn commands_put_each_field_in_its_bits() {
        let mut c = Command::rw(nvm::WRITE, 1, 0x1_2345_6789, 8).prps(0x1000, 0x2000);
        c.set_cid(0xbeef);
        assert_eq!(c.0[0], 0xbeef_0001);
        assert_eq!(c.0[1], 1);
        assert_eq!((c.0[6], c.0[8]), (0x1000, 0x2000));
        assert_eq!((c.0[10], c.0[11], c.0[12]), (0x2345_6789, 1, 7));
        assert_eq!(Command::write_zeroes(1, 0, 1, true).0[12], 1 << 25);
        assert_eq!(Command::deallocate(1, 3).0[10..12], [2, 4]);
        let cq = Command::create_cq(2, 128, 0x10000, 2);
        assert_eq!((cq.0[10], cq.0[11]), (2 | (127 << 16), 3 | (2 << 16)));
        let sq = Command::create_sq(2, 128, 0x20000);
        assert_eq!((sq.0[10], sq.0[11]), (2 | (127 << 16), 1 | (2 << 16)));
        assert_eq!(Command::set_queue_count(4).0[11], 3 | (3 << 16));
        assert_eq!(aqa(32), 31 | (31 << 16));
    }

    #[test]
    fn completions_decode_phase_cid_and_status() {
        let c = Completion::parse([7, 0, 5 | (1 << 16), 9 | (1 << 16) | (0x81 << 17)]);
        assert_eq!((c.result, c.sq_head, c.cid, c.phase), (7, 5, 9, true));
        assert_eq!(c.status, 0x81);
        assert_eq!(Completion::parse([0, 0, 0, 3]).status, 0);
    }

    #[test]
    fn identify_pages_decode_and_odd_formats_are_refused() {
        let mut ctrl = [0u8; PAGE];
        ctrl[77] = 5;
        ctrl[516] = 1;
        ctrl[520] = 0b1100;
        ctrl[525] = 1;
        let c = IdentifyController::parse(&ctrl);
        assert_eq!(
            c,
            IdentifyController {
                mdts: 5,
                namespaces: 1,
                dsm: true,
                write_zeroes: true,
                volatile_write_cache: true
            }
        );
        let mut ns = [0u8; PAGE];
        ns[0..8].copy_from_slice(&1000u64.to_le_bytes());
        ns[26] = 1;
        ns[132..136].copy_from_slice(&(12u32 << 16).to_le_bytes());
        assert_eq!(
            IdentifyNamespace::parse(&ns),
            Some(IdentifyNamespace {
                blocks: 1000,
                block_size: 4096
            })
        );
        ns[132..136].copy_from_slice(&((12u32 << 16) | 8).to_le_bytes());
        assert_eq!(IdentifyNamespace::parse(&ns), None, "metadata per block");
    }
}
