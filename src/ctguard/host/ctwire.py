"""The ctnetlink wire format: the numbers and layouts the dump, its shapes and relief's trim share.

Values from the kernel's UAPI headers: linux/netlink.h (nlmsghdr, NLMSG_*, NLM_F_*, NLA_F_*),
linux/netfilter/nfnetlink.h (NFNL_SUBSYS_CTNETLINK), linux/netfilter/nfnetlink_conntrack.h
(IPCTNL_MSG_*, enum ctattr_*), linux/netfilter/nf_conntrack_common.h (IPS_*).
"""

from __future__ import annotations

import struct

NETLINK_NETFILTER = 12
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
CT_NEW_TYPE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW   # what a dump answers with

# enum ctattr_type
CTA_TUPLE_ORIG = 1
CTA_STATUS = 3
CTA_PROTOINFO = 4
CTA_TIMEOUT = 7
CTA_MARK = 8
CTA_ZONE = 18
# enum ctattr_tuple / ctattr_ip / ctattr_l4proto / ctattr_protoinfo(_tcp)
CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_PROTOINFO_TCP = 1
CTA_PROTOINFO_TCP_STATE = 1

IPS_SEEN_REPLY = 1 << 1
IPS_ASSURED = 1 << 2

NLMSG_HEADER = struct.Struct("=IHHII")   # nlmsghdr: length, type, flags, seq, pid
NLA_HEADER = struct.Struct("=HH")        # nlattr: length, type
ERRNO = struct.Struct("=i")              # NLMSG_ERROR's and NLMSG_DONE's status
BE32 = struct.Struct(">I")
BE16 = struct.Struct(">H")
# The first bytes of NLMSG_DONE (length 20, type 3), as netlink_dump() appends it after the last entry.
DONE_HEAD = NLMSG_HEADER.pack(20, NLMSG_DONE, 0, 0, 0)[:6]
