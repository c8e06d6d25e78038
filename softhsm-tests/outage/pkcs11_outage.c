/*
 * pkcs11_outage.so: a PKCS#11 fault-injection proxy for kekd's end-to-end tests.
 *
 * It makes a token *unreachable* and brings it back, like a network HSM whose link goes
 * down, while the application keeps running: something SoftHSM2 itself cannot do.
 *
 * On the first C_GetFunctionList it dlopen()s the real module named by the environment
 * variable KEKD_OUTAGE_MODULE (SoftHSM2's libsofthsm2.so), takes its function list, and
 * hands out its own list in which every function forwards to the real one, except that
 * while the file named by KEKD_OUTAGE_FLAG exists, every call other than
 * C_GetFunctionList, C_Initialize, C_Finalize and C_GetInfo returns CKR_DEVICE_ERROR
 * without reaching the real module. The real token keeps the keys; the proxy only cuts the
 * link. The flag is checked with one access(2) per call (and read while it exists).
 *
 * A flag file that holds the word `syscall` instead makes the module misbehave rather
 * than fail: every C_Encrypt and C_Decrypt first opens a packet socket (socket(AF_PACKET,
 * SOCK_RAW)), as a library that sniffs the network would, closes it if that worked, and
 * then forwards the call. kekd's seccomp policy does not allow that call, so a worker
 * that enforces it is killed by SIGSYS on the spot.
 *
 * Three more words in the flag file inject the faults a real token produces, each through one
 * check (injected_fault) at the top of every forwarded call; see "Injected faults" below:
 *
 *   device-removed    the token was pulled: slot calls return CKR_TOKEN_NOT_PRESENT, session
 *                     calls CKR_DEVICE_REMOVED; the sessions open at that moment answer
 *                     CKR_SESSION_HANDLE_INVALID once the token is back (a re-plugged token
 *                     forgets them).
 *   session-closed    the sessions open at that moment answer CKR_SESSION_CLOSED (the HSM
 *                     dropped them); new sessions work.
 *   not-initialised   every call returns CKR_CRYPTOKI_NOT_INITIALIZED until the application
 *                     calls C_Finalize and C_Initialize again (once per time the word appears).
 *   max-sessions=N    C_OpenSession returns CKR_SESSION_COUNT while N sessions are open;
 *   [delay=MS]        with delay=MS, each C_Encrypt and C_Decrypt first sleeps MS ms (a
 *                     network HSM's round trip), so that a burst holds sessions long enough
 *                     to overlap.
 *
 * Whatever the flag says, the proxy counts the sessions the application has open, and while
 * it says max-sessions=N it writes `open=A peak=B refused=C` to the file <flag>.sessions each
 * time the peak or the refusals grow: the most sessions the process ever had open at once, and
 * how many C_OpenSession calls it turned away. C_Finalize forgets every session (the module
 * closes them).
 *
 * A flag file that holds the word `hang` makes the module hang instead, like a network HSM
 * that stops answering without closing the link: every call the link carries blocks (sleeping
 * in 50 ms steps) until the flag says something else, then goes on as the flag then says. A
 * call gives up waiting after HANG_MAX_SECONDS (120 s), so a test that forgets the flag never
 * leaves a thread stuck for ever; it then returns CKR_DEVICE_ERROR.
 *
 * Only C_GetFunctionList is exported (built with -fvisibility=hidden), so an application
 * never binds to the proxy's wrappers by symbol and never reaches the real module around
 * them. There is no C_GetInterface: PKCS#11 3.0 callers fall back to the 2.40 list.
 *
 * Built by softhsm-tests/build.rs; the fixture gives the two variables through the
 * tenant's `module_env`.
 */

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <linux/if_ether.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <p11-kit/pkcs11.h>

#define EXPORT __attribute__((visibility("default")))

/* The real module's function list, set once by init(). */
static CK_FUNCTION_LIST_PTR real;
static char *flag_path;
static char *module_path;
static CK_RV init_rv = CKR_GENERAL_ERROR;
static pthread_once_t init_once = PTHREAD_ONCE_INIT;
/* The link state last reported on stderr: 0 up, 1 down. */
static atomic_int reported_down;

static CK_FUNCTION_LIST proxy_list;

static void init(void) {
    const char *module = getenv("KEKD_OUTAGE_MODULE");
    const char *flag = getenv("KEKD_OUTAGE_FLAG");
    if (module == NULL || module[0] == '\0' || flag == NULL || flag[0] == '\0') {
        fprintf(stderr,
                "pkcs11_outage: KEKD_OUTAGE_MODULE (the real PKCS#11 module) and KEKD_OUTAGE_FLAG "
                "(the file whose existence cuts the link) must both be set\n");
        init_rv = CKR_GENERAL_ERROR;
        return;
    }
    module_path = strdup(module);
    flag_path = strdup(flag);
    if (module_path == NULL || flag_path == NULL) {
        init_rv = CKR_HOST_MEMORY;
        return;
    }
    void *lib = dlopen(module_path, RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL) {
        fprintf(stderr, "pkcs11_outage: cannot load %s: %s\n", module_path, dlerror());
        init_rv = CKR_GENERAL_ERROR;
        return;
    }
    CK_C_GetFunctionList get = (CK_C_GetFunctionList)dlsym(lib, "C_GetFunctionList");
    if (get == NULL) {
        fprintf(stderr, "pkcs11_outage: %s has no C_GetFunctionList: %s\n", module_path, dlerror());
        init_rv = CKR_GENERAL_ERROR;
        return;
    }
    CK_FUNCTION_LIST_PTR list = NULL;
    CK_RV rv = get(&list);
    if (rv != CKR_OK || list == NULL) {
        fprintf(stderr, "pkcs11_outage: C_GetFunctionList of %s failed: 0x%lx\n", module_path,
                (unsigned long)rv);
        init_rv = rv != CKR_OK ? rv : CKR_GENERAL_ERROR;
        return;
    }
    real = list;
    proxy_list.version = list->version;
    init_rv = CKR_OK;
}

/* Whether the flag file holds `syscall`: misbehave instead of cutting the link. */
static int flag_says_syscall(void) {
    char buf[16] = {0};
    int fd = open(flag_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    return n >= 7 && strncmp(buf, "syscall", 7) == 0;
}

/* Whether the flag file names an injected fault rather than a cut link (below). */
static int flag_names_fault(void);

/* Whether the link is cut now; reports each change of state on stderr. */
static int link_down(void) {
    int down = access(flag_path, F_OK) == 0 && !flag_says_syscall() && !flag_names_fault();
    if (atomic_exchange(&reported_down, down) != down) {
        if (down) {
            fprintf(stderr, "pkcs11_outage: link to %s cut (%s exists): CKR_DEVICE_ERROR\n", module_path,
                    flag_path);
        } else {
            fprintf(stderr, "pkcs11_outage: link to %s restored\n", module_path);
        }
    }
    return down;
}


/* ---------------------------------------------------------------------------------------
 * Injected faults (device-removed, session-closed, not-initialised, max-sessions=N)
 *
 * Self-contained: the flag's word is read by current_fault(); injected_fault() is the one
 * check each forwarded call makes, and the session bookkeeping below is updated by the
 * wrappers of C_OpenSession, C_CloseSession, C_CloseAllSessions and C_Finalize.
 */

enum fault { FAULT_NONE, FAULT_DEVICE_REMOVED, FAULT_SESSION_CLOSED, FAULT_NOT_INITIALISED, FAULT_MAX_SESSIONS };

#define MAX_TRACKED 4096

static pthread_mutex_t fault_lock = PTHREAD_MUTEX_INITIALIZER;
/* The fault seen by the last call, to act once when a new one starts. */
static int fault_seen = FAULT_NONE;
/* not-initialised: set when the fault starts, cleared by the application's C_Initialize. */
static int uninitialised;
/* Sessions the application has open (as the proxy forwarded them), and those a fault killed
 * with the answer they give from then on (the real session stays open until C_Finalize or
 * C_CloseSession, so its handle is not reused meanwhile). */
static CK_SESSION_HANDLE open_handles[MAX_TRACKED];
static size_t open_count;
static CK_SESSION_HANDLE dead_handles[MAX_TRACKED];
static CK_RV dead_rv[MAX_TRACKED];
static size_t dead_count;
static size_t peak_open;
static unsigned long refused_opens;
static atomic_long session_cap = -1;
static atomic_long op_delay_ms;

/* The fault the flag file names now (FAULT_NONE: none, or another word); sets session_cap. */
static int current_fault(void) {
    char buf[64] = {0};
    int fd = open(flag_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return FAULT_NONE;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return FAULT_NONE;
    if (strncmp(buf, "device-removed", 14) == 0) return FAULT_DEVICE_REMOVED;
    if (strncmp(buf, "session-closed", 14) == 0) return FAULT_SESSION_CLOSED;
    if (strncmp(buf, "not-initialised", 15) == 0) return FAULT_NOT_INITIALISED;
    if (strncmp(buf, "max-sessions=", 13) == 0) {
        session_cap = strtol(buf + 13, NULL, 10);
        const char *delay = strstr(buf, "delay=");
        op_delay_ms = delay != NULL ? strtol(delay + 6, NULL, 10) : 0;
        return FAULT_MAX_SESSIONS;
    }
    return FAULT_NONE;
}

static int flag_names_fault(void) {
    return current_fault() != FAULT_NONE;
}

/* Writes <flag>.sessions; the caller holds fault_lock. */
static void report_sessions(void) {
    char path[4096], tmp[4200], line[128];
    snprintf(path, sizeof path, "%s.sessions", flag_path);
    snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid());
    int len = snprintf(line, sizeof line, "open=%zu peak=%zu refused=%lu\n", open_count, peak_open,
                       refused_opens);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return;
    ssize_t w = write(fd, line, (size_t)len);
    close(fd);
    if (w == len) rename(tmp, path);
}

/* The sessions open now die, answering `rv` from now on; the caller holds fault_lock. */
static void kill_open_sessions(CK_RV rv) {
    for (size_t i = 0; i < open_count && dead_count < MAX_TRACKED; i++) {
        dead_handles[dead_count] = open_handles[i];
        dead_rv[dead_count++] = rv;
    }
}

/* What a dead session answers, or CKR_OK for a live one; the caller holds fault_lock. */
static CK_RV dead_session_rv(CK_SESSION_HANDLE s) {
    for (size_t i = 0; i < dead_count; i++)
        if (dead_handles[i] == s) return dead_rv[i];
    return CKR_OK;
}

static void forget_handle(CK_SESSION_HANDLE *list, CK_RV *rvs, size_t *count, CK_SESSION_HANDLE s) {
    for (size_t i = 0; i < *count; i++) {
        if (list[i] == s) {
            list[i] = list[*count - 1];
            if (rvs) rvs[i] = rvs[*count - 1];
            (*count)--;
            return;
        }
    }
}

/* Whether `name` takes a slot id (or nothing session-like) first rather than a session. */
static int slot_call(const char *name) {
    static const char *const slot_calls[] = {
        "C_GetSlotList", "C_GetSlotInfo", "C_GetTokenInfo", "C_GetMechanismList", "C_GetMechanismInfo",
        "C_InitToken", "C_OpenSession", "C_CloseAllSessions", "C_WaitForSlotEvent", NULL};
    for (int i = 0; slot_calls[i]; i++)
        if (strcmp(name, slot_calls[i]) == 0) return 1;
    return 0;
}

/* The one check of each forwarded call: the answer the injected fault gives `name` (whose
 * first argument is `first`: a session handle, or a slot id), or CKR_OK to forward it. */
static CK_RV injected_fault(const char *name, CK_ULONG first) {
    int fault = current_fault();
    CK_RV rv = CKR_OK;
    pthread_mutex_lock(&fault_lock);
    if (fault != fault_seen) {
        if (fault == FAULT_DEVICE_REMOVED) kill_open_sessions(CKR_SESSION_HANDLE_INVALID);
        if (fault == FAULT_SESSION_CLOSED) kill_open_sessions(CKR_SESSION_CLOSED);
        if (fault == FAULT_NOT_INITIALISED) uninitialised = 1;
        if (fault != FAULT_NONE && fault != FAULT_MAX_SESSIONS)
            fprintf(stderr, "pkcs11_outage: injected fault %d starts\n", fault);
        fault_seen = fault;
    }
    int session = !slot_call(name);
    if (uninitialised) {
        rv = CKR_CRYPTOKI_NOT_INITIALIZED;
    } else if (fault == FAULT_DEVICE_REMOVED) {
        if (strcmp(name, "C_GetSlotList") != 0 && strcmp(name, "C_GetSlotInfo") != 0 &&
            strcmp(name, "C_WaitForSlotEvent") != 0)
            rv = session ? CKR_DEVICE_REMOVED : CKR_TOKEN_NOT_PRESENT;
    } else if (session) {
        rv = dead_session_rv((CK_SESSION_HANDLE)first);
    }
    pthread_mutex_unlock(&fault_lock);
    long delay = op_delay_ms;
    if (fault == FAULT_MAX_SESSIONS && delay > 0 &&
        (strcmp(name, "C_Encrypt") == 0 || strcmp(name, "C_Decrypt") == 0))
        usleep((useconds_t)delay * 1000);
    return rv;
}

/* C_OpenSession with the session count and cap. */
static CK_RV open_counted(CK_SLOT_ID id, CK_FLAGS f, CK_VOID_PTR app, CK_NOTIFY notify,
                          CK_SESSION_HANDLE_PTR out) {
    int capped = current_fault() == FAULT_MAX_SESSIONS;
    pthread_mutex_lock(&fault_lock);
    if (capped && session_cap >= 0 && open_count >= (size_t)session_cap) {
        refused_opens++;
        report_sessions();
        pthread_mutex_unlock(&fault_lock);
        return CKR_SESSION_COUNT;
    }
    CK_RV rv = real->C_OpenSession(id, f, app, notify, out);
    if (rv == CKR_OK && out != NULL && open_count < MAX_TRACKED) {
        open_handles[open_count++] = *out;
        if (open_count > peak_open) {
            peak_open = open_count;
            if (capped) report_sessions();
        }
    }
    pthread_mutex_unlock(&fault_lock);
    return rv;
}

/* C_CloseSession, forgetting the session whatever the module answers. */
static CK_RV close_counted(CK_SESSION_HANDLE s) {
    pthread_mutex_lock(&fault_lock);
    CK_RV dead = dead_session_rv(s);
    forget_handle(open_handles, NULL, &open_count, s);
    forget_handle(dead_handles, dead_rv, &dead_count, s);
    pthread_mutex_unlock(&fault_lock);
    CK_RV rv = real->C_CloseSession(s);
    return dead != CKR_OK ? dead : rv;
}

static void forget_all_sessions(void) {
    pthread_mutex_lock(&fault_lock);
    open_count = 0;
    dead_count = 0;
    pthread_mutex_unlock(&fault_lock);
}

/* C_Initialize ends a not-initialised fault, C_Finalize closes every session. */
static void fault_saw_initialize(CK_RV rv) {
    pthread_mutex_lock(&fault_lock);
    if (rv == CKR_OK && uninitialised) {
        uninitialised = 0;
        fprintf(stderr, "pkcs11_outage: re-initialised by the application\n");
    }
    pthread_mutex_unlock(&fault_lock);
}

#define FIRST_ARG(a, ...) a
/* --- `hang` mode -------------------------------------------------------------------- */

/* Longest a call waits while the flag says `hang`. */
#define HANG_MAX_SECONDS 120

/* Whether the flag file holds `hang`. */
static int flag_says_hang(void) {
    char buf[16] = {0};
    if (flag_path == NULL) return 0;
    int fd = open(flag_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    return n >= 4 && strncmp(buf, "hang", 4) == 0;
}

/* Blocks the calling thread while the flag file holds `hang`, up to HANG_MAX_SECONDS; returns
 * whether it gave up (the flag still says `hang`). */
static int hang_while_flagged(const char *name) {
    if (!flag_says_hang()) return 0;
    fprintf(stderr, "pkcs11_outage: %s hangs (%s says hang)\n", name, flag_path);
    for (int i = 0; i < HANG_MAX_SECONDS * 20; i++) {
        usleep(50 * 1000);
        if (!flag_says_hang()) {
            fprintf(stderr, "pkcs11_outage: %s goes on\n", name);
            return 0;
        }
    }
    fprintf(stderr, "pkcs11_outage: %s gave up hanging after %d s\n", name, HANG_MAX_SECONDS);
    return 1;
}

/* --- end of `hang` mode ------------------------------------------------------------- */

/* Forwarded always: loading and unloading the library, and its static information. */
#define PASS(name, params, args)                                                                   \
    static CK_RV proxy_##name params {                                                             \
        if (real == NULL) return CKR_CRYPTOKI_NOT_INITIALIZED;                                     \
        if (real->name == NULL) return CKR_FUNCTION_NOT_SUPPORTED;                                 \
        return real->name args;                                                                    \
    }

/* Forwarded while the link is up; CKR_DEVICE_ERROR while it is cut. */
#define PROXY(name, params, args)                                                                  \
    static CK_RV proxy_##name params {                                                             \
        if (real == NULL) return CKR_CRYPTOKI_NOT_INITIALIZED;                                     \
        if (real->name == NULL) return CKR_FUNCTION_NOT_SUPPORTED;                                 \
        if (hang_while_flagged(#name)) return CKR_DEVICE_ERROR;                                    \
        CK_RV fault = injected_fault(#name, (CK_ULONG)(FIRST_ARG args));                           \
        if (fault != CKR_OK) return fault;                                                         \
        if (link_down()) return CKR_DEVICE_ERROR;                                                  \
        return real->name args;                                                                    \
    }

/* Forwarded like PROXY, after a system call no PKCS#11 module has any business making
 * when the flag file says `syscall`. */
#define MISBEHAVE(name, params, args)                                                              \
    static CK_RV proxy_##name params {                                                             \
        if (real == NULL) return CKR_CRYPTOKI_NOT_INITIALIZED;                                     \
        if (real->name == NULL) return CKR_FUNCTION_NOT_SUPPORTED;                                 \
        if (hang_while_flagged(#name)) return CKR_DEVICE_ERROR;                                    \
        if (access(flag_path, F_OK) == 0 && flag_says_syscall()) {                                 \
            fprintf(stderr, "pkcs11_outage: " #name " opens a packet socket\n");                  \
            int fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, htons(ETH_P_ALL));                 \
            if (fd >= 0) close(fd);                                                                \
        }                                                                                          \
        CK_RV fault = injected_fault(#name, (CK_ULONG)(FIRST_ARG args));                           \
        if (fault != CKR_OK) return fault;                                                         \
        if (link_down()) return CKR_DEVICE_ERROR;                                                  \
        return real->name args;                                                                    \
    }

/* PROXY, forwarding through `via` (session bookkeeping) instead of the real function. */
#define PROXY_VIA(name, params, args, via)                                                         \
    static CK_RV proxy_##name params {                                                             \
        if (real == NULL) return CKR_CRYPTOKI_NOT_INITIALIZED;                                     \
        if (real->name == NULL) return CKR_FUNCTION_NOT_SUPPORTED;                                 \
        if (hang_while_flagged(#name)) return CKR_DEVICE_ERROR;                                    \
        CK_RV fault = injected_fault(#name, (CK_ULONG)(FIRST_ARG args));                           \
        if (fault != CKR_OK) return fault;                                                         \
        if (link_down()) return CKR_DEVICE_ERROR;                                                  \
        return via args;                                                                           \
    }

/* C_Initialize and C_Finalize: forwarded always, and seen by the fault injection. */
static CK_RV proxy_C_Initialize(CK_VOID_PTR a) {
    if (real == NULL) return CKR_CRYPTOKI_NOT_INITIALIZED;
    CK_RV rv = real->C_Initialize(a);
    fault_saw_initialize(rv);
    return rv;
}

static CK_RV proxy_C_Finalize(CK_VOID_PTR a) {
    if (real == NULL) return CKR_CRYPTOKI_NOT_INITIALIZED;
    CK_RV rv = real->C_Finalize(a);
    forget_all_sessions();
    return rv;
}

static CK_RV close_all_counted(CK_SLOT_ID id) {
    CK_RV rv = real->C_CloseAllSessions(id);
    if (rv == CKR_OK) forget_all_sessions();
    return rv;
}

#define S CK_SESSION_HANDLE s
#define M CK_MECHANISM_PTR m
#define BUF(n) CK_BYTE_PTR n, CK_ULONG n##_len
#define OUT(n) CK_BYTE_PTR n, CK_ULONG_PTR n##_len

PASS(C_GetInfo, (CK_INFO_PTR a), (a))

PROXY(C_GetSlotList, (CK_BBOOL p, CK_SLOT_ID_PTR l, CK_ULONG_PTR n), (p, l, n))
PROXY(C_GetSlotInfo, (CK_SLOT_ID id, CK_SLOT_INFO_PTR i), (id, i))
PROXY(C_GetTokenInfo, (CK_SLOT_ID id, CK_TOKEN_INFO_PTR i), (id, i))
PROXY(C_GetMechanismList, (CK_SLOT_ID id, CK_MECHANISM_TYPE_PTR l, CK_ULONG_PTR n), (id, l, n))
PROXY(C_GetMechanismInfo, (CK_SLOT_ID id, CK_MECHANISM_TYPE t, CK_MECHANISM_INFO_PTR i), (id, t, i))
PROXY(C_InitToken, (CK_SLOT_ID id, BUF(pin), CK_UTF8CHAR_PTR label), (id, pin, pin_len, label))
PROXY(C_InitPIN, (S, BUF(pin)), (s, pin, pin_len))
PROXY(C_SetPIN, (S, BUF(old), BUF(new)), (s, old, old_len, new, new_len))
PROXY_VIA(C_OpenSession, (CK_SLOT_ID id, CK_FLAGS f, CK_VOID_PTR app, CK_NOTIFY notify, CK_SESSION_HANDLE_PTR out),
          (id, f, app, notify, out), open_counted)
PROXY_VIA(C_CloseSession, (S), (s), close_counted)
PROXY_VIA(C_CloseAllSessions, (CK_SLOT_ID id), (id), close_all_counted)
PROXY(C_GetSessionInfo, (S, CK_SESSION_INFO_PTR i), (s, i))
PROXY(C_GetOperationState, (S, OUT(state)), (s, state, state_len))
PROXY(C_SetOperationState, (S, BUF(state), CK_OBJECT_HANDLE ek, CK_OBJECT_HANDLE ak),
      (s, state, state_len, ek, ak))
PROXY(C_Login, (S, CK_USER_TYPE u, BUF(pin)), (s, u, pin, pin_len))
PROXY(C_Logout, (S), (s))
PROXY(C_CreateObject, (S, CK_ATTRIBUTE_PTR t, CK_ULONG n, CK_OBJECT_HANDLE_PTR o), (s, t, n, o))
PROXY(C_CopyObject, (S, CK_OBJECT_HANDLE o, CK_ATTRIBUTE_PTR t, CK_ULONG n, CK_OBJECT_HANDLE_PTR no),
      (s, o, t, n, no))
PROXY(C_DestroyObject, (S, CK_OBJECT_HANDLE o), (s, o))
PROXY(C_GetObjectSize, (S, CK_OBJECT_HANDLE o, CK_ULONG_PTR n), (s, o, n))
PROXY(C_GetAttributeValue, (S, CK_OBJECT_HANDLE o, CK_ATTRIBUTE_PTR t, CK_ULONG n), (s, o, t, n))
PROXY(C_SetAttributeValue, (S, CK_OBJECT_HANDLE o, CK_ATTRIBUTE_PTR t, CK_ULONG n), (s, o, t, n))
PROXY(C_FindObjectsInit, (S, CK_ATTRIBUTE_PTR t, CK_ULONG n), (s, t, n))
PROXY(C_FindObjects, (S, CK_OBJECT_HANDLE_PTR o, CK_ULONG max, CK_ULONG_PTR n), (s, o, max, n))
PROXY(C_FindObjectsFinal, (S), (s))
PROXY(C_EncryptInit, (S, M, CK_OBJECT_HANDLE k), (s, m, k))
MISBEHAVE(C_Encrypt, (S, BUF(in), OUT(out)), (s, in, in_len, out, out_len))
PROXY(C_EncryptUpdate, (S, BUF(in), OUT(out)), (s, in, in_len, out, out_len))
PROXY(C_EncryptFinal, (S, OUT(out)), (s, out, out_len))
PROXY(C_DecryptInit, (S, M, CK_OBJECT_HANDLE k), (s, m, k))
MISBEHAVE(C_Decrypt, (S, BUF(in), OUT(out)), (s, in, in_len, out, out_len))
PROXY(C_DecryptUpdate, (S, BUF(in), OUT(out)), (s, in, in_len, out, out_len))
PROXY(C_DecryptFinal, (S, OUT(out)), (s, out, out_len))
PROXY(C_DigestInit, (S, M), (s, m))
PROXY(C_Digest, (S, BUF(in), OUT(out)), (s, in, in_len, out, out_len))
PROXY(C_DigestUpdate, (S, BUF(in)), (s, in, in_len))
PROXY(C_DigestKey, (S, CK_OBJECT_HANDLE k), (s, k))
PROXY(C_DigestFinal, (S, OUT(out)), (s, out, out_len))
PROXY(C_SignInit, (S, M, CK_OBJECT_HANDLE k), (s, m, k))
PROXY(C_Sign, (S, BUF(in), OUT(out)), (s, in, in_len, out, out_len))
PROXY(C_SignUpdate, (S, BUF(in)), (s, in, in_len))
PROXY(C_SignFinal, (S, OUT(out)), (s, out, out_len))
PROXY(C_SignRecoverInit, (S, M, CK_OBJECT_HANDLE k), (s, m, k))
PROXY(C_SignRecover, (S, BUF(in), OUT(out)), (s, in, in_len, out, out_len))
PROXY(C_VerifyInit, (S, M, CK_OBJECT_HANDLE k), (s, m, k))
PROXY(C_Verify, (S, BUF(in), BUF(sig)), (s, in, in_len, sig, sig_len))
PROXY(C_VerifyUpdate, (S, BUF(in)), (s, in, in_len))
PROXY(C_VerifyFinal, (S, BUF(sig)), (s, sig, sig_len))
PROXY(C_VerifyRecoverInit, (S, M, CK_OBJECT_HANDLE k), (s, m, k))
PROXY(C_VerifyRecover, (S, BUF(sig), OUT(out)), (s, sig, sig_len, out, out_len))
PROXY(C_DigestEncryptUpdate, (S, BUF(in), OUT(out)), (s, in, in_len, out, out_len))
PROXY(C_DecryptDigestUpdate, (S, BUF(in), OUT(out)), (s, in, in_len, out, out_len))
PROXY(C_SignEncryptUpdate, (S, BUF(in), OUT(out)), (s, in, in_len, out, out_len))
PROXY(C_DecryptVerifyUpdate, (S, BUF(in), OUT(out)), (s, in, in_len, out, out_len))
PROXY(C_GenerateKey, (S, M, CK_ATTRIBUTE_PTR t, CK_ULONG n, CK_OBJECT_HANDLE_PTR k), (s, m, t, n, k))
PROXY(C_GenerateKeyPair,
      (S, M, CK_ATTRIBUTE_PTR pt, CK_ULONG pn, CK_ATTRIBUTE_PTR st, CK_ULONG sn, CK_OBJECT_HANDLE_PTR pk,
       CK_OBJECT_HANDLE_PTR sk),
      (s, m, pt, pn, st, sn, pk, sk))
PROXY(C_WrapKey, (S, M, CK_OBJECT_HANDLE wk, CK_OBJECT_HANDLE k, OUT(out)), (s, m, wk, k, out, out_len))
PROXY(C_UnwrapKey,
      (S, M, CK_OBJECT_HANDLE uk, BUF(in), CK_ATTRIBUTE_PTR t, CK_ULONG n, CK_OBJECT_HANDLE_PTR k),
      (s, m, uk, in, in_len, t, n, k))
PROXY(C_DeriveKey, (S, M, CK_OBJECT_HANDLE bk, CK_ATTRIBUTE_PTR t, CK_ULONG n, CK_OBJECT_HANDLE_PTR k),
      (s, m, bk, t, n, k))
PROXY(C_SeedRandom, (S, BUF(in)), (s, in, in_len))
PROXY(C_GenerateRandom, (S, CK_BYTE_PTR out, CK_ULONG n), (s, out, n))
PROXY(C_GetFunctionStatus, (S), (s))
PROXY(C_CancelFunction, (S), (s))
PROXY(C_WaitForSlotEvent, (CK_FLAGS f, CK_SLOT_ID_PTR id, CK_VOID_PTR r), (f, id, r))

EXPORT CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR out);

static CK_FUNCTION_LIST proxy_list = {
    .version = {CRYPTOKI_VERSION_MAJOR, CRYPTOKI_VERSION_MINOR},
#define E(name) .name = proxy_##name
    E(C_Initialize), E(C_Finalize), E(C_GetInfo), .C_GetFunctionList = C_GetFunctionList,
    E(C_GetSlotList), E(C_GetSlotInfo), E(C_GetTokenInfo), E(C_GetMechanismList),
    E(C_GetMechanismInfo), E(C_InitToken), E(C_InitPIN), E(C_SetPIN), E(C_OpenSession),
    E(C_CloseSession), E(C_CloseAllSessions), E(C_GetSessionInfo), E(C_GetOperationState),
    E(C_SetOperationState), E(C_Login), E(C_Logout), E(C_CreateObject), E(C_CopyObject),
    E(C_DestroyObject), E(C_GetObjectSize), E(C_GetAttributeValue), E(C_SetAttributeValue),
    E(C_FindObjectsInit), E(C_FindObjects), E(C_FindObjectsFinal), E(C_EncryptInit), E(C_Encrypt),
    E(C_EncryptUpdate), E(C_EncryptFinal), E(C_DecryptInit), E(C_Decrypt), E(C_DecryptUpdate),
    E(C_DecryptFinal), E(C_DigestInit), E(C_Digest), E(C_DigestUpdate), E(C_DigestKey),
    E(C_DigestFinal), E(C_SignInit), E(C_Sign), E(C_SignUpdate), E(C_SignFinal),
    E(C_SignRecoverInit), E(C_SignRecover), E(C_VerifyInit), E(C_Verify), E(C_VerifyUpdate),
    E(C_VerifyFinal), E(C_VerifyRecoverInit), E(C_VerifyRecover), E(C_DigestEncryptUpdate),
    E(C_DecryptDigestUpdate), E(C_SignEncryptUpdate), E(C_DecryptVerifyUpdate), E(C_GenerateKey),
    E(C_GenerateKeyPair), E(C_WrapKey), E(C_UnwrapKey), E(C_DeriveKey), E(C_SeedRandom),
    E(C_GenerateRandom), E(C_GetFunctionStatus), E(C_CancelFunction), E(C_WaitForSlotEvent),
#undef E
};

EXPORT CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR out) {
    if (out == NULL) return CKR_ARGUMENTS_BAD;
    pthread_once(&init_once, init);
    if (init_rv != CKR_OK) return init_rv;
    *out = &proxy_list;
    return CKR_OK;
}
