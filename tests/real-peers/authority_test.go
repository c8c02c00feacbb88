package realpeers

// Every Unix socket devhost serves, called by grpc-go (the kubelet's gRPC
// library) with each `:authority` real clients send on a Unix socket.

import (
	"context"
	"net"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	deviceplugin "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
	drapb "k8s.io/kubelet/pkg/apis/dra/v1"
	pluginregistration "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// dialUnix connects to a Unix socket whatever grpc-go made of the target.
func dialUnix(ctx context.Context, socket string) (net.Conn, error) {
	return (&net.Dialer{}).DialContext(ctx, "unix", socket)
}

// clientStyles are the ways real clients reach a Unix socket, by the
// `:authority` they send.
var clientStyles = []struct {
	name string
	conn func(socket string) (*grpc.ClientConn, error)
}{
	// The kubelet's plugin watcher: a bare path, no WithAuthority; grpc-go
	// sends the percent-encoded path (gRPC C-core >= 1.57 does too).
	{"bare path: percent-encoded path (plugin watcher, grpcio)", func(socket string) (*grpc.ClientConn, error) {
		// The watcher's own call (operation_generator.go, dial), less WithBlock.
		return grpc.Dial(socket, grpc.WithTransportCredentials(insecure.NewCredentials()), //nolint:staticcheck // as the kubelet does
			grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) { return dialUnix(ctx, addr) }))
	}},
	// The kubelet's DRA client: "unix:" + path, authority localhost.
	{"unix: target: localhost (DRA manager)", func(socket string) (*grpc.ClientConn, error) {
		return grpc.NewClient("unix:"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	}},
	// The kubelet's device manager: WithAuthority("localhost").
	{"WithAuthority localhost (device manager)", func(socket string) (*grpc.ClientConn, error) {
		return grpc.NewClient("passthrough:///"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithAuthority("localhost"),
			grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return dialUnix(ctx, socket) }))
	}},
	// grpc-java: the raw, unencoded path.
	{"raw path (grpc-java)", func(socket string) (*grpc.ClientConn, error) {
		return grpc.NewClient("passthrough:///"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithAuthority(socket),
			grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return dialUnix(ctx, socket) }))
	}},
}

func TestEverySocketAnswersTheAuthoritiesRealClientsSend(t *testing.T) {
	a := realAPIServer(t)
	ctx, _ := testContext(t, 2*time.Minute)
	const nodeName = "node-authority"
	a.node(t, ctx, nodeName)
	n := newNode(t)
	kubeconfig := a.devhostKubeconfig(t, ctx, n)
	n.staticBackend("gpus", gpu, []string{"gpu-0"}, draResource)
	n.staticBackend("nics", "example.com/nic", []string{"nic-0"}, "")
	n.hostConfig(draSettings(n, nodeName, kubeconfig, false))
	d := startDevhost(t, n, "devhost.log")

	find := func(what, pattern string) string {
		var socket string
		eventually(t, wait, "devhost serves "+what, func() (bool, string) {
			found, _ := filepath.Glob(n.path(pattern))
			if len(found) == 1 {
				socket = found[0]
				return true, ""
			}
			return false, d.exitNote()
		})
		return socket
	}
	sockets := []struct {
		name, socket string
		call         func(ctx context.Context, conn *grpc.ClientConn) error
	}{
		{"device plugin", find("a device plugin socket", "device-plugins/devhost-*.sock"), func(ctx context.Context, conn *grpc.ClientConn) error {
			_, err := deviceplugin.NewDevicePluginClient(conn).GetDevicePluginOptions(ctx, &deviceplugin.Empty{})
			return err
		}},
		{"DRA registration", find("the DRA registration socket", "plugins_registry/*-reg.sock"), func(ctx context.Context, conn *grpc.ClientConn) error {
			_, err := pluginregistration.NewRegistrationClient(conn).GetInfo(ctx, &pluginregistration.InfoRequest{})
			return err
		}},
		{"DRA service", find("the DRA service socket", "plugins/"+driver+"/*.sock"), func(ctx context.Context, conn *grpc.ClientConn) error {
			_, err := drapb.NewDRAPluginClient(conn).NodePrepareResources(ctx, &drapb.NodePrepareResourcesRequest{})
			return err
		}},
	}
	for _, s := range sockets {
		for _, style := range clientStyles {
			t.Run(s.name+"/"+style.name, func(t *testing.T) {
				conn, err := style.conn(s.socket)
				if err != nil {
					t.Fatal(err)
				}
				defer conn.Close()
				callCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
				defer cancel()
				if err := s.call(callCtx, conn); err != nil {
					t.Errorf("%s socket %s: %v", s.name, s.socket, err)
				}
			})
		}
	}
}
