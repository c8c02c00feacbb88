/*
 * The smallest native devhost backend in plain C: two devices of
 * example.com/native-c, the second of which a background thread flips
 * between Healthy and Unhealthy every flip_interval_ms (from its [config]
 * table, default 1000), publishing each change. allocate answers with an
 * env, a mount, a device node, an annotation and a CDI name per device;
 * pre_start is required and logs.
 *
 * Build: cc -shared -fPIC -pthread -I abi/include -o libdevhost_example_native_c.so examples/native-c/example.c
 */
#include <devhost_backend.h>

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define RESOURCE "example.com/native-c"

static DevhostStr str(const char *s) { DevhostStr out = {(const uint8_t *)s, strlen(s)}; return out; }
static DevhostStr str_n(const uint8_t *p, size_t n) { DevhostStr out = {p, n}; return out; }

typedef struct Example {
    const DevhostHostApi *api;
    DevhostHost *host;
    long flip_ms;
    int stop;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    pthread_t flipper;
} Example;

static int publish(Example *ex, int last_healthy) {
    DevhostDevice devices[2];
    const char *ids[2] = {"c-0", "c-1"};
    for (int i = 0; i < 2; i++) {
        memset(&devices[i], 0, sizeof devices[i]);
        devices[i].struct_size = sizeof(DevhostDevice);
        devices[i].health = (i == 1 && !last_healthy) ? DEVHOST_HEALTH_UNHEALTHY : DEVHOST_HEALTH_HEALTHY;
        devices[i].id = str(ids[i]);
    }
    return ex->api->publish(ex->host, str(RESOURCE), devices, 2);
}

static void *flip(void *arg) {
    Example *ex = arg;
    int healthy = 1;
    pthread_mutex_lock(&ex->lock);
    while (!ex->stop) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += ex->flip_ms / 1000;
        until.tv_nsec += (ex->flip_ms % 1000) * 1000000L;
        if (until.tv_nsec >= 1000000000L) { until.tv_sec++; until.tv_nsec -= 1000000000L; }
        if (pthread_cond_timedwait(&ex->wake, &ex->lock, &until) != 0 && !ex->stop) {
            healthy = !healthy;
            publish(ex, healthy);
        }
    }
    pthread_mutex_unlock(&ex->lock);
    return NULL;
}

/* Reads "key": <number> from the JSON config; a real backend would use a JSON parser. */
static long config_number(DevhostStr json, const char *key, long fallback) {
    char buf[1024], pattern[64];
    size_t n = json.len < sizeof buf - 1 ? json.len : sizeof buf - 1;
    memcpy(buf, json.ptr ? (const char *)json.ptr : "", n);
    buf[n] = 0;
    snprintf(pattern, sizeof pattern, "\"%s\":", key);
    const char *at = strstr(buf, pattern);
    return at ? strtol(at + strlen(pattern), NULL, 10) : fallback;
}

static int32_t example_init(const DevhostInitArgs *args, DevhostCall *call, void **instance) {
    const DevhostHostApi *api = args->host_api;
    Example *ex = calloc(1, sizeof *ex);
    if (!ex) { api->set_error(call, str("out of memory")); return DEVHOST_ERROR; }
    ex->api = api;
    ex->host = args->host;
    ex->flip_ms = config_number(args->config_json, "flip_interval_ms", 1000);
    pthread_mutex_init(&ex->lock, NULL);
    pthread_cond_init(&ex->wake, NULL);
    DevhostResource resource = {sizeof(DevhostResource), DEVHOST_RESOURCE_PRE_START_REQUIRED, str(RESOURCE)};
    if (api->add_resource(call, &resource) != DEVHOST_OK || publish(ex, 1) != DEVHOST_OK
        || pthread_create(&ex->flipper, NULL, flip, ex) != 0) {
        api->set_error(call, str("could not declare, publish or start the flipper thread"));
        free(ex);
        return DEVHOST_ERROR;
    }
    *instance = ex;
    return DEVHOST_OK;
}

static int32_t example_allocate(void *instance, DevhostCall *call, DevhostStr resource, const DevhostStr *ids, size_t count) {
    const DevhostHostApi *api = ((Example *)instance)->api;
    char joined[4096] = "";
    (void)resource;
    for (size_t i = 0; i < count; i++) {
        char container[256], host[256], cdi[256];
        int n = (int)ids[i].len;
        snprintf(joined + strlen(joined), sizeof joined - strlen(joined), "%s%.*s", i ? "," : "", n, (const char *)ids[i].ptr);
        snprintf(container, sizeof container, "/var/run/example/%.*s", n, (const char *)ids[i].ptr);
        snprintf(host, sizeof host, "/run/example/%.*s", n, (const char *)ids[i].ptr);
        DevhostMount mount = {sizeof(DevhostMount), 1, str(container), str(host)};
        api->add_mount(call, &mount);
        snprintf(container, sizeof container, "/dev/example-%.*s", n, (const char *)ids[i].ptr);
        DevhostDeviceSpec spec = {sizeof(DevhostDeviceSpec), 0, str(container), str("/dev/null"), str("rw")};
        api->add_device_spec(call, &spec);
        snprintf(cdi, sizeof cdi, "example.com/device=%.*s", n, (const char *)ids[i].ptr);
        api->add_cdi_device(call, str(cdi));
    }
    api->add_env(call, str("EXAMPLE_DEVICES"), str(joined));
    api->add_annotation(call, str("example.com/devices"), str(joined));
    return DEVHOST_OK;
}

static int32_t example_pre_start(void *instance, DevhostCall *call, DevhostStr resource, const DevhostStr *ids, size_t count) {
    Example *ex = instance;
    char line[256];
    (void)call; (void)ids;
    snprintf(line, sizeof line, "preparing %zu device(s) of %.*s", count, (int)resource.len, (const char *)resource.ptr);
    ex->api->log(ex->host, DEVHOST_LOG_INFO, str_n((const uint8_t *)line, strlen(line)));
    return DEVHOST_OK;
}

static void example_shutdown(void *instance) {
    Example *ex = instance;
    pthread_mutex_lock(&ex->lock);
    ex->stop = 1;
    pthread_cond_signal(&ex->wake);
    pthread_mutex_unlock(&ex->lock);
    pthread_join(ex->flipper, NULL);
    pthread_cond_destroy(&ex->wake);
    pthread_mutex_destroy(&ex->lock);
    free(ex);
}

static const DevhostBackendApi TABLE = {
    sizeof(DevhostBackendApi), DEVHOST_ABI_VERSION,
    example_init, example_allocate, NULL /* preferred_allocation: host default */, example_pre_start, example_shutdown,
};

DEVHOST_EXPORT const DevhostBackendApi *devhost_backend_entry(const DevhostHostApi *host) {
    /* Refuse a host of another major: its table may be laid out differently. */
    if (!host || DEVHOST_ABI_VERSION_MAJOR_OF(host->abi_version) != DEVHOST_ABI_VERSION_MAJOR) return NULL;
    return &TABLE;
}
