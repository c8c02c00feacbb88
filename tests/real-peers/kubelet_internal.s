// Present so that the Go compiler accepts the body-less declaration in
// kubelet_internal.go (a go:linkname to the kubelet); it holds no code.
