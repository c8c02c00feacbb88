"""An independent gRPC client for devhost's sockets: Python grpcio (gRPC
C-core, its own HTTP/2 and HPACK), dialling each socket as `unix:<path>`
with grpcio's *default* :authority (from C-core 1.57 on, the socket path
percent-encoded, as the kubelet's plugin watcher sends it).

Usage: grpc_client.py PROTO_DIR CALL... where each CALL is one of
  device-plugin:<socket>:<device id>   GetDevicePluginOptions, the first
                                       ListAndWatch list, Allocate(<id>),
                                       GetPreferredAllocation(1 of the list)
  registration:<socket>                GetInfo, NotifyRegistrationStatus
  dra:<socket>:<claim uid>             NodePrepareResources and
                                       NodeUnprepareResources (v1) of one
                                       claim, the first message of the health
                                       stream in v1 and in v1alpha1
Prints one JSON object a line per RPC: {"rpc", "ok", "answer" | "error"}.
Exits 0 when every line was printed (failed RPCs included), 2 on misuse.
"""

import importlib
import json
import os
import sys
import tempfile

import grpc
from google.protobuf import json_format
from grpc_tools import protoc

PROTOS = {
    "deviceplugin": "deviceplugin/v1beta1/api.proto",
    "registration": "pluginregistration/v1/api.proto",
    "dra": "dra/v1/api.proto",
    "health_v1": "dra-health/v1/api.proto",
    # The service only: the messages are v1's.
    "health_v1alpha1": "dra-health/v1alpha1/api.proto",
}
TIMEOUT = 10


def compile_protos(proto_dir):
    """Compiles each proto with grpcio-tools' protoc and loads its messages."""
    out = tempfile.mkdtemp(prefix="devhost-grpcio-")
    sys.path.insert(0, out)
    modules = {}
    for name, path in PROTOS.items():
        include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
        status = protoc.main(["protoc", f"-I{proto_dir}", f"-I{include}", f"--python_out={out}", path])
        if status != 0:
            sys.exit(f"protoc failed on {path}")
        # protoc writes "-" in a path as "_"; a module imports the modules
        # of the files it imports by their dotted paths.
        module = importlib.import_module(path.replace("-", "_").replace("/", ".").removesuffix(".proto") + "_pb2")
        modules[name] = module
    return modules


def report(rpc, call):
    """Runs one RPC and prints what came of it."""
    try:
        answer = call()
        line = {"rpc": rpc, "ok": True, "answer": json_format.MessageToDict(answer)}
    except grpc.RpcError as error:
        line = {"rpc": rpc, "ok": False, "error": f"{error.code().name}: {error.details()}"}
    print(json.dumps(line), flush=True)


def unary(channel, path, request, response):
    method = channel.unary_unary(
        path, request_serializer=type(request).SerializeToString, response_deserializer=response.FromString
    )
    return lambda: method(request, timeout=TIMEOUT)


def first_of_stream(channel, path, request, response):
    method = channel.unary_stream(
        path, request_serializer=type(request).SerializeToString, response_deserializer=response.FromString
    )

    def call():
        stream = method(request, timeout=TIMEOUT)
        try:
            return next(stream)
        finally:
            stream.cancel()

    return call


def device_plugin(pb, socket, device):
    channel = grpc.insecure_channel(f"unix:{socket}")
    service = "/v1beta1.DevicePlugin/"
    report("GetDevicePluginOptions", unary(channel, service + "GetDevicePluginOptions", pb.Empty(), pb.DevicePluginOptions))
    report("ListAndWatch", first_of_stream(channel, service + "ListAndWatch", pb.Empty(), pb.ListAndWatchResponse))
    request = pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=[device])])
    report("Allocate", unary(channel, service + "Allocate", request, pb.AllocateResponse))
    preferred = pb.PreferredAllocationRequest(
        container_requests=[pb.ContainerPreferredAllocationRequest(available_deviceIDs=[device], allocation_size=1)]
    )
    report("GetPreferredAllocation", unary(channel, service + "GetPreferredAllocation", preferred, pb.PreferredAllocationResponse))
    channel.close()


def registration(pb, socket):
    channel = grpc.insecure_channel(f"unix:{socket}")
    service = "/pluginregistration.Registration/"
    report("GetInfo", unary(channel, service + "GetInfo", pb.InfoRequest(), pb.PluginInfo))
    status = pb.RegistrationStatus(plugin_registered=True)
    report("NotifyRegistrationStatus", unary(channel, service + "NotifyRegistrationStatus", status, pb.RegistrationStatusResponse))
    channel.close()


def dra(modules, socket, uid):
    pb = modules["dra"]
    channel = grpc.insecure_channel(f"unix:{socket}")
    service = "/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/"
    claims = [pb.Claim(namespace="ml", uid=uid, name="grpcio")]
    report(
        "NodePrepareResources",
        unary(channel, service + "NodePrepareResources", pb.NodePrepareResourcesRequest(claims=claims), pb.NodePrepareResourcesResponse),
    )
    report(
        "NodeUnprepareResources",
        unary(channel, service + "NodeUnprepareResources", pb.NodeUnprepareResourcesRequest(claims=claims), pb.NodeUnprepareResourcesResponse),
    )
    # v1alpha1's messages are v1's (the same fields and numbers).
    health = modules["health_v1"]
    for version in ("v1", "v1alpha1"):
        report(
            f"{version}.NodeWatchResources",
            first_of_stream(
                channel,
                f"/{version}.DRAResourceHealth/NodeWatchResources",
                health.NodeWatchResourcesRequest(),
                health.NodeWatchResourcesResponse,
            ),
        )
    channel.close()


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    modules = compile_protos(argv[1])
    for call in argv[2:]:
        kind, _, rest = call.partition(":")
        if kind == "device-plugin":
            socket, _, device = rest.rpartition(":")
            device_plugin(modules["deviceplugin"], socket, device)
        elif kind == "registration":
            registration(modules["registration"], rest)
        elif kind == "dra":
            socket, _, uid = rest.rpartition(":")
            dra(modules, socket, uid)
        else:
            print(f"unknown call {call!r}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
