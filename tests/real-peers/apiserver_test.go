package realpeers

// A real etcd (embed.StartEtcd) and a real kube-apiserver (its own Run,
// with command-line flags as an operator would give them) in this process,
// on loopback, shared by every test that needs an API server: started by
// the first, stopped in TestMain. Authentication: a static token for an
// admin in system:masters, and service-account tokens (TokenRequest) for
// devhost, whose rights come from deploy/kubernetes/rbac.yaml alone.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spf13/pflag"
	"go.etcd.io/etcd/server/v3/embed"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
	"k8s.io/kubernetes/cmd/kube-apiserver/app/options"
)

const adminToken = "devhost-peers-admin-token"

// apiServer is the running etcd + kube-apiserver.
type apiServer struct {
	dir   string
	url   string
	caPEM []byte
	admin kubernetes.Interface
	stop  func()
}

var (
	apiOnce   sync.Once
	api       *apiServer
	apiErr    error
	klogFile  *os.File
	apiLogDir string
)

func TestMain(m *testing.M) {
	// The API server, etcd and kubelet code that logs without a context
	// log through klog's global logger: into a file, not the test output.
	dir, err := os.MkdirTemp("", "devhost-peers-logs-")
	if err == nil {
		apiLogDir = dir
		klogFile, err = os.Create(filepath.Join(dir, "klog.log"))
	}
	if err == nil {
		flags := flag.NewFlagSet("klog", flag.ContinueOnError)
		klog.InitFlags(flags)
		for name, value := range map[string]string{"logtostderr": "false", "alsologtostderr": "false", "stderrthreshold": "FATAL"} {
			_ = flags.Set(name, value)
		}
		klog.SetOutput(klogFile)
	}
	code := m.Run()
	if api != nil {
		api.stop()
	}
	if code != 0 && apiLogDir != "" {
		fmt.Fprintf(os.Stderr, "real-peers: the API server's and etcd's logs are kept in %s\n", apiLogDir)
	} else if apiLogDir != "" {
		os.RemoveAll(apiLogDir)
	}
	os.Exit(code)
}

// lastGlobalLog is the last line klog's global logger wrote that contains
// substr ("(none)" if none).
func lastGlobalLog(substr string) string {
	if klogFile == nil {
		return "(klog's global output is not captured)"
	}
	klog.Flush()
	data, err := os.ReadFile(klogFile.Name())
	if err != nil {
		return err.Error()
	}
	last := "(none)"
	for _, line := range strings.Split(string(data), "\n") {
		if strings.Contains(line, substr) {
			last = line
		}
	}
	return last
}

// realAPIServer is the shared API server, started on first use.
func realAPIServer(t *testing.T) *apiServer {
	t.Helper()
	apiOnce.Do(func() {
		started := time.Now()
		api, apiErr = startAPIServer()
		if apiErr == nil {
			t.Logf("etcd and kube-apiserver ready at %s in %v", api.url, time.Since(started).Round(time.Millisecond))
		}
	})
	if apiErr != nil {
		t.Fatalf("etcd + kube-apiserver: %v", apiErr)
	}
	return api
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func startEtcd(dir string) (*embed.Etcd, string, error) {
	clientPort, err := freePort()
	if err != nil {
		return nil, "", err
	}
	peerPort, err := freePort()
	if err != nil {
		return nil, "", err
	}
	client := url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", clientPort)}
	peer := url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", peerPort)}
	cfg := embed.NewConfig()
	cfg.Dir = filepath.Join(dir, "etcd")
	cfg.ListenClientUrls = []url.URL{client}
	cfg.AdvertiseClientUrls = []url.URL{client}
	cfg.ListenPeerUrls = []url.URL{peer}
	cfg.AdvertisePeerUrls = []url.URL{peer}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.LogLevel = "warn"
	cfg.LogOutputs = []string{filepath.Join(apiLogDir, "etcd.log")}
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, "", fmt.Errorf("start etcd: %w", err)
	}
	select {
	case <-e.Server.ReadyNotify():
		return e, client.String(), nil
	case err := <-e.Err():
		e.Close()
		return nil, "", fmt.Errorf("etcd: %w", err)
	case <-time.After(60 * time.Second):
		e.Close()
		return nil, "", errors.New("etcd not ready after 60 s")
	}
}

// writePEM writes one PEM block.
func writePEM(path, kind string, der []byte) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), 0o600)
}

// serverCerts writes a CA, a serving certificate for 127.0.0.1 and
// localhost signed by it, and the service-account signing key; returns
// the CA's PEM.
func serverCerts(dir string) ([]byte, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	caTemplate := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "devhost-peers-ca"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTemplate, caTemplate, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, err
	}
	servingKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	servingDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "kube-apiserver"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		DNSNames:     []string{"localhost", "kubernetes.default.svc"},
	}, ca, &servingKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	if err := writePEM(filepath.Join(dir, "serving.crt"), "CERTIFICATE", servingDER); err != nil {
		return nil, err
	}
	for name, key := range map[string]*ecdsa.PrivateKey{"serving.key": servingKey} {
		der, err := x509.MarshalECPrivateKey(key)
		if err != nil {
			return nil, err
		}
		if err := writePEM(filepath.Join(dir, name), "EC PRIVATE KEY", der); err != nil {
			return nil, err
		}
	}
	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	saDER, err := x509.MarshalECPrivateKey(saKey)
	if err != nil {
		return nil, err
	}
	if err := writePEM(filepath.Join(dir, "sa.key"), "EC PRIVATE KEY", saDER); err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), nil
}

func startAPIServer() (server *apiServer, err error) {
	dir, err := os.MkdirTemp("", "devhost-peers-apiserver-")
	if err != nil {
		return nil, err
	}
	var cleanups []func()
	stop := func() {
		for i := len(cleanups) - 1; i >= 0; i-- {
			cleanups[i]()
		}
		os.RemoveAll(dir)
	}
	defer func() {
		if err != nil {
			stop()
		}
	}()

	e, etcdURL, err := startEtcd(dir)
	if err != nil {
		return nil, err
	}
	cleanups = append(cleanups, e.Close)

	caPEM, err := serverCerts(dir)
	if err != nil {
		return nil, fmt.Errorf("certificates: %w", err)
	}
	tokens := filepath.Join(dir, "tokens.csv")
	if err := os.WriteFile(tokens, []byte(adminToken+",devhost-peers-admin,devhost-peers-admin,system:masters\n"), 0o600); err != nil {
		return nil, err
	}

	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	port := listener.Addr().(*net.TCPAddr).Port

	s := options.NewServerRunOptions()
	flags := pflag.NewFlagSet("kube-apiserver", pflag.ContinueOnError)
	for _, set := range s.Flags().FlagSets {
		flags.AddFlagSet(set)
	}
	args := []string{
		"--etcd-servers=" + etcdURL,
		"--bind-address=127.0.0.1",
		fmt.Sprintf("--secure-port=%d", port),
		"--advertise-address=127.0.0.1",
		"--cert-dir=" + filepath.Join(dir, "certs"),
		"--tls-cert-file=" + filepath.Join(dir, "serving.crt"),
		"--tls-private-key-file=" + filepath.Join(dir, "serving.key"),
		"--token-auth-file=" + tokens,
		"--authorization-mode=RBAC",
		"--enable-priority-and-fairness=false",
		"--service-account-issuer=https://devhost-peers.invalid",
		"--service-account-key-file=" + filepath.Join(dir, "sa.key"),
		"--service-account-signing-key-file=" + filepath.Join(dir, "sa.key"),
		"--service-cluster-ip-range=10.0.0.0/24",
		"--endpoint-reconciler-type=none",
	}
	if err := flags.Parse(args); err != nil {
		listener.Close()
		return nil, fmt.Errorf("kube-apiserver flags: %w", err)
	}
	s.SecureServing.Listener = listener
	if err := s.GenericServerRunOptions.ComponentGlobalsRegistry.Set(); err != nil {
		return nil, fmt.Errorf("kube-apiserver feature gates: %w", err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	completed, err := s.Complete(ctx)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("kube-apiserver options: %w", err)
	}
	if errs := completed.Validate(); len(errs) != 0 {
		cancel()
		return nil, fmt.Errorf("kube-apiserver options: %v", errs)
	}
	exited := make(chan error, 1)
	go func() { exited <- app.Run(ctx, completed) }()
	cleanups = append(cleanups, func() {
		cancel()
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
		}
	})

	serverURL := fmt.Sprintf("https://127.0.0.1:%d", port)
	config := &rest.Config{
		Host:            serverURL,
		BearerToken:     adminToken,
		TLSClientConfig: rest.TLSClientConfig{CAData: caPEM},
		QPS:             100,
		Burst:           200,
	}
	admin, err := kubernetes.NewForConfig(config)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(2 * time.Minute)
	for {
		var status int
		result := admin.CoreV1().RESTClient().Get().AbsPath("/readyz").Do(ctx).StatusCode(&status)
		if status == 200 {
			break
		}
		select {
		case err := <-exited:
			return nil, fmt.Errorf("kube-apiserver exited: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			body, _ := result.Raw()
			return nil, fmt.Errorf("kube-apiserver not ready after 2 minutes: %d %s %v", status, body, result.Error())
		}
		time.Sleep(100 * time.Millisecond)
	}
	server = &apiServer{dir: dir, url: serverURL, caPEM: caPEM, admin: admin, stop: stop}
	if err := server.applyDeployRBAC(ctx); err != nil {
		return nil, err
	}
	return server, nil
}

// The manifests that give devhost its API-server access, as shipped.
var deployManifests = []string{"namespace.yaml", "serviceaccount.yaml", "rbac.yaml"}

// applyDeployRBAC creates what deploy/kubernetes/{namespace,serviceaccount,
// rbac}.yaml declare, and nothing else: a kind this does not know fails,
// so a new object in those files is not silently skipped.
func (a *apiServer) applyDeployRBAC(ctx context.Context) error {
	for _, name := range deployManifests {
		path := filepath.Join("..", "..", "deploy", "kubernetes", name)
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		reader := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
		for {
			doc, err := reader.Read()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				return fmt.Errorf("%s: %w", path, err)
			}
			if len(bytes.TrimSpace(doc)) == 0 {
				continue
			}
			obj, _, err := scheme.Codecs.UniversalDeserializer().Decode(doc, nil, nil)
			if err != nil {
				return fmt.Errorf("%s: %w", path, err)
			}
			switch o := obj.(type) {
			case *corev1.Namespace:
				_, err = a.admin.CoreV1().Namespaces().Create(ctx, o, metav1.CreateOptions{})
			case *corev1.ServiceAccount:
				_, err = a.admin.CoreV1().ServiceAccounts(o.Namespace).Create(ctx, o, metav1.CreateOptions{})
			case *rbacv1.ClusterRole:
				_, err = a.admin.RbacV1().ClusterRoles().Create(ctx, o, metav1.CreateOptions{})
			case *rbacv1.ClusterRoleBinding:
				_, err = a.admin.RbacV1().ClusterRoleBindings().Create(ctx, o, metav1.CreateOptions{})
			case *rbacv1.Role:
				_, err = a.admin.RbacV1().Roles(o.Namespace).Create(ctx, o, metav1.CreateOptions{})
			case *rbacv1.RoleBinding:
				_, err = a.admin.RbacV1().RoleBindings(o.Namespace).Create(ctx, o, metav1.CreateOptions{})
			default:
				return fmt.Errorf("%s: a %T; the real-peer tests do not know how to apply it", path, obj)
			}
			if err != nil {
				return fmt.Errorf("%s: %w", path, err)
			}
		}
	}
	return nil
}

// node creates a Node object named name (no kubelet behind it).
func (a *apiServer) node(t *testing.T, ctx context.Context, name string) *corev1.Node {
	t.Helper()
	created, err := a.admin.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		created, err = a.admin.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
	}
	if err != nil {
		t.Fatalf("node %s: %v", name, err)
	}
	return created
}

// devhostKubeconfig writes a kubeconfig for devhost's ServiceAccount
// (devhost/devhost from deploy/kubernetes), with a token from a
// TokenRequest, and returns its path.
func (a *apiServer) devhostKubeconfig(t *testing.T, ctx context.Context, n *node) string {
	t.Helper()
	return a.devhostKubeconfigBoundTo(t, ctx, n, nil)
}

// devhostKubeconfigBoundTo is devhostKubeconfig with a token bound to pod
// (nil: to nothing), as the kubelet projects into devhost's DaemonSet pod:
// the API server then knows the token's node (the pod's), which is what
// the associated-node verbs of DRA's status authorization ask for.
func (a *apiServer) devhostKubeconfigBoundTo(t *testing.T, ctx context.Context, n *node, pod *corev1.Pod) string {
	t.Helper()
	expiry := int64(3600)
	spec := authenticationv1.TokenRequestSpec{ExpirationSeconds: &expiry}
	if pod != nil {
		spec.BoundObjectRef = &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID}
	}
	token, err := a.admin.CoreV1().ServiceAccounts("devhost").CreateToken(ctx, "devhost",
		&authenticationv1.TokenRequest{Spec: spec}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("a token for the devhost ServiceAccount: %v", err)
	}
	text := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: peers
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: devhost
  user:
    token: %s
contexts:
- name: devhost
  context:
    cluster: peers
    user: devhost
current-context: devhost
`, a.url, base64.StdEncoding.EncodeToString(a.caPEM), token.Status.Token)
	return n.write("kubeconfig", text)
}
