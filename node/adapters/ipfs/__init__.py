"""IPFS for OpenLoRA adapters: our own, verifying implementation of the formats we rely on.

Publish:  `dag = import_directory(path)` gives the CID Kubo's `ipfs add -r --cid-version=1` would,
          and `await KuboRpcClient(url).publish(dag)` imports its CAR into an IPFS node and pins it.
Fetch:    `await fetch_verified(cid, gateways, dest_dir, max_bytes=...)` downloads the DAG as a
          CAR from trustless gateways, checks every block against the CID as it streams, and
          rebuilds the files under `dest_dir / str(cid)` (atomically; nothing on failure).
Develop:  `LocalIpfsNode(repo_dir)` runs a local Helia node with Kubo's endpoints.

See docs/ipfs.md for the formats, the trust model and the API.
"""

from node.adapters.ipfs.car import CAR_MEDIA_TYPE, CarParser
from node.adapters.ipfs.cids import parse_cid
from node.adapters.ipfs.errors import (
    AllGatewaysFailed,
    BlockHashMismatch,
    CarFormatError,
    GatewayError,
    GatewayTimeout,
    InvalidCid,
    IpfsError,
    KuboRpcError,
    LocalNodeError,
    MissingBlock,
    PinError,
    SizeLimitExceeded,
    SourceChanged,
    StorageError,
    TruncatedCar,
    UnexpectedRoot,
    UnixFSError,
    UnreferencedBlock,
    UnsupportedCid,
    UnsupportedEntry,
)
from node.adapters.ipfs.gateway import GatewayClient, fetch_verified
from node.adapters.ipfs.importer import CHUNK_SIZE, MAX_LINKS, UnixfsDag, import_directory, import_file
from node.adapters.ipfs.kubo import KuboRpcClient, NodeVersion
from node.adapters.ipfs.localnode import LocalIpfsNode
from node.adapters.ipfs.verifier import (
    VerifiedDownload,
    partial_downloads,
    remove_abandoned_downloads,
    verify_car_file,
)

__all__ = [
    "CAR_MEDIA_TYPE",
    "CHUNK_SIZE",
    "MAX_LINKS",
    "AllGatewaysFailed",
    "BlockHashMismatch",
    "CarFormatError",
    "CarParser",
    "GatewayClient",
    "GatewayError",
    "GatewayTimeout",
    "InvalidCid",
    "IpfsError",
    "KuboRpcClient",
    "KuboRpcError",
    "LocalIpfsNode",
    "LocalNodeError",
    "MissingBlock",
    "NodeVersion",
    "PinError",
    "SizeLimitExceeded",
    "SourceChanged",
    "StorageError",
    "TruncatedCar",
    "UnexpectedRoot",
    "UnixFSError",
    "UnixfsDag",
    "UnreferencedBlock",
    "UnsupportedCid",
    "UnsupportedEntry",
    "VerifiedDownload",
    "fetch_verified",
    "import_directory",
    "import_file",
    "parse_cid",
    "partial_downloads",
    "remove_abandoned_downloads",
    "verify_car_file",
]
