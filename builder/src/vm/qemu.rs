//! The qemu command line of a local boot: direct kernel boot of the image's own kernel, a
//! throw-away overlay over the baked disk (the image stays pristine, like an AMI under an
//! instance), user-mode networking with the metadata address and any host services forwarded
//! into the guest, and chosen guest ports forwarded to the host.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

/// Where the emulated instance metadata service answers, as on EC2.
pub const IMDS_ADDR: &str = "169.254.169.254:80";

/// qemu's user-mode network (see `args`).
pub const NETWORK: &str = "169.254.0.0/16";

/// The accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// A guest address whose connections reach a host service (through `builder relay`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestForward {
    pub guest: SocketAddr,
    pub host: SocketAddr,
}

/// `GUEST_IP:PORT=HOST:PORT`, such as `10.0.2.100:9418=127.0.0.1:9418`.
pub fn parse_guest_forward(s: &str) -> Result<GuestForward, String> {
    let (g, h) = s.split_once('=').ok_or_else(|| {
        format!(
            "{s:?}: expected GUEST_IP:PORT=HOST:PORT, such as 169.254.0.100:9418=127.0.0.1:9418"
        )
    })?;
    let guest: SocketAddr = g
        .parse()
        .map_err(|e| format!("{s:?}: the guest address {g:?} is not IP:PORT ({e})"))?;
    let host: SocketAddr = h
        .parse()
        .map_err(|e| format!("{s:?}: the host address {h:?} is not IP:PORT ({e})"))?;
    Ok(GuestForward { guest, host })
}

/// A host port that reaches a guest port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortForward {
    pub host: u16,
    pub guest: u16,
}

/// `HOST:GUEST` or a lone `PORT` for both.
pub fn parse_port_forward(s: &str) -> Result<PortForward, String> {
    let parse = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| format!("{s:?}: expected HOST_PORT:GUEST_PORT, such as 8080:80"))
    };
    match s.split_once(':') {
        Some((h, g)) => Ok(PortForward {
            host: parse(h)?,
            guest: parse(g)?,
        }),
        None => {
            let p = parse(s)?;
            Ok(PortForward { host: p, guest: p })
        }
    }
}

/// Everything that goes on qemu's command line.
#[derive(Debug, Clone)]
pub struct QemuSpec {
    pub accel: Accel,
    /// `-cpu` under KVM (TCG keeps qemu's default model).
    pub cpu: Option<String>,
    pub memory_mib: u32,
    pub cpus: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    pub disk: PathBuf,
    pub ports: Vec<PortForward>,
    pub forwards: Vec<GuestForward>,
    /// The program guestfwd runs per connection; it is given the host address to relay to.
    pub relay: PathBuf,
    /// The instance the guest is: its firmware says so as a Nitro instance's does (below).
    pub instance_id: String,
    pub instance_type: String,
    /// The NIC's MAC address, the one the metadata service describes.
    pub mac: String,
}

/// A Nitro instance's system UUID: `ec2` and hex digits, the same in the serial number. cloud-init
/// and other tools take exactly that as "this is EC2" (cloud-init's Ec2 datasource then asks
/// IMDS for a token at once, in its local stage, as on a real instance). Derived from the
/// instance id, so one instance keeps its UUID across boots.
pub fn ec2_system_uuid(instance_id: &str) -> String {
    let mut hex: String = instance_id
        .trim_start_matches("i-")
        .chars()
        .filter(char::is_ascii_hexdigit)
        .map(|c| c.to_ascii_lowercase())
        .take(29)
        .collect();
    while hex.len() < 29 {
        hex.push('0');
    }
    let h = format!("ec2{hex}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// qemu-system-x86_64's arguments. The serial console goes to stdout; there is no display, no
/// monitor and no reboot (a guest that reboots or panics ends the run).
pub fn args(spec: &QemuSpec) -> Vec<String> {
    // The metadata address must lie inside the user network for guestfwd, so the network is
    // the link-local /16: the guest is 169.254.0.15, the host's gateway 169.254.0.2.
    let mut netdev = format!("user,id=net0,net={NETWORK}");
    for p in &spec.ports {
        netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{}-:{}", p.host, p.guest));
    }
    for f in &spec.forwards {
        netdev.push_str(&format!(
            ",guestfwd=tcp:{}:{}-cmd:{} relay {}",
            f.guest.ip(),
            f.guest.port(),
            shell_word(&spec.relay),
            f.host
        ));
    }
    let mut a: Vec<String> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
    match spec.accel {
        Accel::Kvm => push(&[
            "-accel",
            "kvm",
            "-cpu",
            spec.cpu.as_deref().unwrap_or("host"),
        ]),
        Accel::Tcg => push(&["-accel", "tcg"]),
    }
    push(&[
        "-m",
        &spec.memory_mib.to_string(),
        "-smp",
        &spec.cpus.to_string(),
    ]);
    push(&[
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
    ]);
    push(&[
        "-kernel",
        &spec.kernel.to_string_lossy(),
        "-initrd",
        &spec.initrd.to_string_lossy(),
    ]);
    push(&["-append", &format!("{} panic=-1", spec.cmdline)]);
    push(&[
        "-drive",
        &format!(
            "file={},format=qcow2,if=virtio,cache=unsafe",
            spec.disk.to_string_lossy().replace(',', ",,")
        ),
    ]);
    let uuid = ec2_system_uuid(&spec.instance_id);
    push(&[
        "-smbios",
        &format!(
            "type=1,manufacturer=Amazon EC2,product={},uuid={uuid},serial={uuid}",
            spec.instance_type.replace(',', ",,")
        ),
        "-smbios",
        &format!(
            "type=3,manufacturer=Amazon EC2,asset={}",
            spec.instance_id.replace(',', ",,")
        ),
    ]);
    push(&[
        "-netdev",
        &netdev,
        "-device",
        &format!("virtio-net-pci,netdev=net0,mac={}", spec.mac),
    ]);
    push(&["-device", "virtio-rng-pci"]);
    a
}

/// guestfwd's `cmd:` is run by a shell.
fn shell_word(p: &Path) -> String {
    let s = p.to_string_lossy();
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+".contains(c))
    {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The metadata service's guest address.
pub fn imds_guest_addr() -> SocketAddr {
    IMDS_ADDR
        .parse()
        .unwrap_or_else(|_| SocketAddr::from((Ipv4Addr::new(169, 254, 169, 254), 80)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_parse_and_bad_ones_say_the_form() {
        let f = parse_guest_forward("169.254.0.100:9418=127.0.0.1:40000").unwrap();
        assert_eq!(f.guest.to_string(), "169.254.0.100:9418");
        assert_eq!(f.host.port(), 40000);
        assert!(parse_guest_forward("169.254.0.100:9418")
            .unwrap_err()
            .contains("GUEST_IP:PORT=HOST:PORT"));
        assert!(parse_guest_forward("x=127.0.0.1:1")
            .unwrap_err()
            .contains("guest address"));
        assert_eq!(
            parse_port_forward("8080:80").unwrap(),
            PortForward {
                host: 8080,
                guest: 80
            }
        );
        assert_eq!(
            parse_port_forward("22").unwrap(),
            PortForward {
                host: 22,
                guest: 22
            }
        );
        assert!(parse_port_forward("a:80")
            .unwrap_err()
            .contains("HOST_PORT:GUEST_PORT"));
    }

    #[test]
    fn the_command_line_boots_the_kernel_with_forwards() {
        let spec = QemuSpec {
            accel: Accel::Tcg,
            cpu: None,
            memory_mib: 1024,
            cpus: 2,
            kernel: "/o/vmlinuz".into(),
            initrd: "/o/initrd.img".into(),
            cmdline: "root=/dev/vda console=ttyS0".into(),
            disk: "/t/over,lay.qcow2".into(),
            ports: vec![PortForward {
                host: 18080,
                guest: 8080,
            }],
            forwards: vec![GuestForward {
                guest: imds_guest_addr(),
                host: "127.0.0.1:5555".parse().unwrap(),
            }],
            relay: "/usr/bin/my builder".into(),
            instance_id: "i-0123456789abcdef0".into(),
            instance_type: "t3.micro".into(),
            mac: "52:54:00:12:34:56".into(),
        };
        let a = args(&spec).join(" ");
        assert!(a.starts_with("-accel tcg -m 1024 -smp 2"), "{a}");
        assert!(
            a.contains("-append root=/dev/vda console=ttyS0 panic=-1"),
            "{a}"
        );
        assert!(a.contains("file=/t/over,,lay.qcow2,format=qcow2"), "{a}");
        assert!(a.contains("hostfwd=tcp:127.0.0.1:18080-:8080"), "{a}");
        assert!(
            a.contains(
                "guestfwd=tcp:169.254.169.254:80-cmd:'/usr/bin/my builder' relay 127.0.0.1:5555"
            ),
            "{a}"
        );
        assert!(
            a.contains("-smbios type=1,manufacturer=Amazon EC2,product=t3.micro,uuid=ec201234-5678-9abc-def0-000000000000,serial=ec201234-5678-9abc-def0-000000000000"),
            "{a}"
        );
        assert!(
            a.contains("-smbios type=3,manufacturer=Amazon EC2,asset=i-0123456789abcdef0"),
            "{a}"
        );
        assert!(
            a.contains("virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56"),
            "{a}"
        );
    }

    #[test]
    fn the_system_uuid_is_a_nitro_one_from_the_instance_id() {
        assert_eq!(
            ec2_system_uuid("i-0a1b2c3d4e5f60718"),
            "ec20a1b2-c3d4-e5f6-0718-000000000000"
        );
        // A long or odd id still gives a well-formed UUID starting with ec2.
        let u = ec2_system_uuid("i-ffffffffffffffffffffffffffffffffffff");
        assert_eq!(u, "ec2fffff-ffff-ffff-ffff-ffffffffffff");
        let u = ec2_system_uuid("local");
        assert_eq!(u, "ec2ca000-0000-0000-0000-000000000000");
    }
}
