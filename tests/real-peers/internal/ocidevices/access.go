// Package ocidevices reads an OCI runtime spec the way the container sees
// it: shared by the CDI oracle program (cmd/cdi-inject) and the real-peer
// tests' runtime check, so both judge a container by one rule.
package ocidevices

import (
	"strings"

	oci "github.com/opencontainers/runtime-spec/specs-go"
)

// Access is what the cgroup lets the container do with a device node: the
// union of every allow rule naming its type and numbers (rules add up; a
// node reached twice, plain and through CDI, gets both rules). Each letter
// once, r, w, m first, then any other as it came: a bad letter stays
// visible instead of being dropped.
func Access(spec *oci.Spec, d oci.LinuxDevice) string {
	granted := ""
	if spec.Linux == nil || spec.Linux.Resources == nil {
		return granted
	}
	for _, rule := range spec.Linux.Resources.Devices {
		if rule.Allow && rule.Type == d.Type && rule.Major != nil && *rule.Major == d.Major &&
			rule.Minor != nil && *rule.Minor == d.Minor {
			granted += rule.Access
		}
	}
	union := ""
	for _, letter := range "rwm" + granted {
		if strings.ContainsRune(granted, letter) && !strings.ContainsRune(union, letter) {
			union += string(letter)
		}
	}
	return union
}

// AddPlain adds a device node the kubelet passed in the CRI config as
// containerd does: the node at containerPath with the host node's type
// and numbers, and a cgroup rule allowing permissions ("rwm" if empty).
func AddPlain(spec *oci.Spec, containerPath, kind string, major, minor int64, permissions string) {
	spec.Linux.Devices = append(spec.Linux.Devices, oci.LinuxDevice{Path: containerPath, Type: kind, Major: major, Minor: minor})
	if permissions == "" {
		permissions = "rwm"
	}
	spec.Linux.Resources.Devices = append(spec.Linux.Resources.Devices, oci.LinuxDeviceCgroup{
		Allow: true, Type: kind, Major: &major, Minor: &minor, Access: permissions,
	})
}
