package hooks

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/mqtt-ha/broker/internal/mosquitto"
)

// Reasons passed to AuthOptions.OnAuthFailure. They are a small fixed set so
// they can be metric label values.
const (
	AuthReasonAnonymous   = "anonymous"    // no username and allow_anonymous is false
	AuthReasonUnknownUser = "unknown_user" // username not in password_file (or no password_file and allow_anonymous false)
	AuthReasonBadPassword = "bad_password" // wrong or missing password
)

// ErrAuthInitConfig is returned by Init when given a config: Auth is built
// with NewAuth, so its files are loaded (and can fail) before the server
// starts.
var ErrAuthInitConfig = errors.New("auth hook: Init takes no config; build the hook with NewAuth and add it with AddHook(h, nil)")

// AuthOptions configures Auth. The zero value refuses anonymous clients and
// has no password or ACL file, so nobody can connect (Mosquitto 2 behaves
// the same); cmd/broker sets AllowAnonymous from mosquitto.conf, or to true
// when there is none.
type AuthOptions struct {
	AllowAnonymous bool
	PasswordFile   string // "" = no password file: any username is accepted when AllowAnonymous
	ACLFile        string // "" = no ACL: every client may use every topic
	Logger         *slog.Logger
	// OnAuthFailure is called once per refused CONNECT with one of the
	// AuthReason constants. Nil is fine.
	OnAuthFailure func(reason string)
	// OnACLDenied is called for every refused check with "read", "write" or
	// "subscribe". It must be cheap (a counter): it runs on the publish path.
	OnACLDenied func(access string)
}

// Auth enforces Mosquitto's allow_anonymous, password_file and acl_file on a
// mochi server. It must be the only hook providing OnConnectAuthenticate and
// OnACLCheck (mochi allows as soon as one hook says yes), and it should be
// added first so its OnPublish runs before any other hook's.
type Auth struct {
	mqtt.HookBase
	opts AuthOptions
	log  *slog.Logger

	rules    atomic.Pointer[authRules] // swapped whole by Reload
	reloadMu sync.Mutex                // orders concurrent Reloads

	// logged holds the connections whose first ACL denial was logged, so a
	// client hammering a forbidden topic costs one log line per connection.
	// Entries are removed on disconnect; loggedN bounds the map for offline
	// sessions that receive denied deliveries after their disconnect.
	logged  sync.Map // *mqtt.Client -> struct{}
	loggedN atomic.Int64
}

type authRules struct {
	passwords *mosquitto.PasswordFile // nil: no password_file
	acl       *mosquitto.ACL          // nil: no acl_file
}

// maxLoggedClients bounds Auth.logged; when it is reached the set is
// cleared, which at worst logs a client's denial a second time.
const maxLoggedClients = 10_000

var _ mqtt.Hook = (*Auth)(nil)

// NewAuth builds the hook and loads the configured files.
func NewAuth(opts AuthOptions) (*Auth, error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	a := &Auth{opts: opts, log: log.With("component", "auth")}
	if err := a.Reload(); err != nil {
		return nil, err
	}
	return a, nil
}

// ID implements mqtt.Hook.
func (a *Auth) ID() string { return "mosquitto-auth" }

// Provides implements mqtt.Hook. OnPublish and OnDisconnect are needed
// besides the two auth events: see OnPublish and logDenied.
func (a *Auth) Provides(b byte) bool {
	switch b {
	case mqtt.OnConnectAuthenticate, mqtt.OnACLCheck, mqtt.OnPublish, mqtt.OnDisconnect:
		return true
	}
	return false
}

// Init implements mqtt.Hook.
func (a *Auth) Init(config any) error {
	if config != nil {
		return ErrAuthInitConfig
	}
	return nil
}

// Reload re-reads the password and ACL files and swaps them in atomically,
// for SIGHUP. Connected clients stay connected; like Mosquitto, new rules
// apply to new CONNECTs and to every later publish, subscribe and delivery.
// On error the old rules stay in force.
func (a *Auth) Reload() error {
	a.reloadMu.Lock()
	defer a.reloadMu.Unlock()
	next := &authRules{}
	if a.opts.PasswordFile != "" {
		pf, err := loadFile(a.opts.PasswordFile, mosquitto.ParsePasswordFile)
		if err != nil {
			return fmt.Errorf("load password_file: %w", err)
		}
		next.passwords = pf
	}
	if a.opts.ACLFile != "" {
		acl, err := loadFile(a.opts.ACLFile, mosquitto.ParseACL)
		if err != nil {
			return fmt.Errorf("load acl_file: %w", err)
		}
		next.acl = acl
	}
	a.rules.Store(next)
	a.log.Info("auth rules loaded",
		"allow_anonymous", a.opts.AllowAnonymous,
		"password_file", a.opts.PasswordFile, "users", next.passwords.Len(),
		"acl_file", a.opts.ACLFile, "acl_rules", next.acl.Rules())
	return nil
}

func loadFile[T any](path string, parse func(string, io.Reader) (T, error)) (T, error) {
	f, err := os.Open(path)
	if err != nil {
		var zero T
		return zero, err
	}
	defer f.Close()
	return parse(path, f)
}

// OnConnectAuthenticate implements Mosquitto 2's rules (checked against
// mosquitto 2.0.11): no username needs allow_anonymous; with a password_file
// a username must be in it with the right password, whatever
// allow_anonymous says; without one, a username is accepted only when
// allow_anonymous is true. An empty username counts as anonymous.
func (a *Auth) OnConnectAuthenticate(cl *mqtt.Client, pk packets.Packet) bool {
	if cl.Net.Inline {
		return true // the cluster injects forwarded messages through an inline client
	}
	r := a.rules.Load()
	user := string(pk.Connect.Username)
	switch {
	case user == "":
		if !a.opts.AllowAnonymous {
			return a.refuse(cl, user, AuthReasonAnonymous)
		}
	case r.passwords != nil:
		if !pk.Connect.PasswordFlag || !r.passwords.Verify(user, string(pk.Connect.Password)) {
			reason := AuthReasonBadPassword
			if !r.passwords.Has(user) {
				reason = AuthReasonUnknownUser
			}
			return a.refuse(cl, user, reason)
		}
	case !a.opts.AllowAnonymous:
		return a.refuse(cl, user, AuthReasonUnknownUser)
	}
	a.dropForbiddenWill(cl, pk, r)
	return true
}

// dropForbiddenWill removes a will whose topic the client may not publish
// to. mochi publishes wills without any ACL check, which would let a client
// write anywhere by disconnecting; Mosquitto accepts the CONNECT and silently
// never sends such a will (verified with 2.0.11). Clearing it here (before
// the session exists, so nothing reads it concurrently) has the same effect,
// except that the check uses the ACL of connect time, not of disconnect time.
func (a *Auth) dropForbiddenWill(cl *mqtt.Client, pk packets.Packet, r *authRules) {
	if !pk.Connect.WillFlag || r.acl == nil {
		return
	}
	if r.acl.Allowed(cl.ID, string(pk.Connect.Username), pk.Connect.WillTopic, mosquitto.Write) {
		return
	}
	cl.Properties.Will = mqtt.Will{}
	a.logDenied(cl, pk.Connect.WillTopic, mosquitto.Write)
}

func (a *Auth) refuse(cl *mqtt.Client, user, reason string) bool {
	if a.opts.OnAuthFailure != nil {
		a.opts.OnAuthFailure(reason)
	}
	// One line per refused connection; never the password.
	a.log.Info("client authentication failed",
		"client_id", cl.ID, "username", user, "remote", cl.Net.Remote,
		"listener", cl.Net.Listener, "reason", reason)
	return false
}

// OnACLCheck maps mochi's question to an ACL access. mochi asks with
// write=false both when a client subscribes (topic is the filter) and when a
// message is about to be delivered to it (topic is the topic name), and with
// write=true when it publishes. A filter is recognised by its wildcards or
// $share prefix; a plain filter is checked as a read of that topic, which is
// the same answer the ACL gives for Subscribe.
//
// On refusal mochi answers SUBACK 0x87 (0x80 for MQTT 3), PUBACK/PUBREC 0x87
// to MQTT 5 publishers, drops QoS 0 publishes silently, and skips the
// delivery. MQTT 3 publishes are handled in OnPublish instead.
func (a *Auth) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	if cl.Net.Inline {
		return true
	}
	r := a.rules.Load()
	if r.acl == nil {
		return true
	}
	if write && cl.Properties.ProtocolVersion < 5 {
		return true // decided in OnPublish, see there
	}
	access := mosquitto.Write
	if !write {
		access, topic = filterAccess(topic)
	}
	if r.acl.Allowed(cl.ID, string(cl.Properties.Username), topic, access) {
		return true
	}
	a.logDenied(cl, topic, access)
	return false
}

// filterAccess is what mochi's read check of topic asks the ACL.
func filterAccess(topic string) (mosquitto.Access, string) {
	switch {
	case len(topic) >= len("$share/") && strings.EqualFold(topic[:len("$share/")], "$share/"):
		// mochi treats the prefix case-insensitively; normalise it so the
		// ACL sees the same shared subscription mochi does.
		return mosquitto.Subscribe, "$share/" + topic[len("$share/"):]
	case strings.ContainsAny(topic, "+#"):
		return mosquitto.Subscribe, topic
	}
	return mosquitto.Read, topic
}

// SubscribeAllowed reports whether the ACL lets clientID, logged in as
// username, subscribe to filter: the answer a SUBSCRIBE gets (the importer
// of Mosquitto sessions asks it for the subscriptions it brings in).
func (a *Auth) SubscribeAllowed(clientID, username, filter string) bool {
	r := a.rules.Load()
	if r.acl == nil {
		return true
	}
	access, filter := filterAccess(filter)
	return r.acl.Allowed(clientID, username, filter, access)
}

// OnPublish refuses publishes from MQTT 3.x clients the way Mosquitto does:
// acknowledged normally and dropped (verified with 2.0.11: PUBACK rc 0 and
// nothing delivered). If OnACLCheck refused them instead, mochi would
// disconnect the client on QoS 1/2, and a client that retries forever would
// reconnect forever. CodeSuccessIgnore makes mochi send the normal
// PUBACK/PUBREC and then neither retain nor deliver the message; it still
// calls OnPublished with pk.Ignore set, so hooks that forward or store
// publishes must skip packets with Ignore set.
func (a *Auth) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if cl.Net.Inline || cl.Properties.ProtocolVersion >= 5 {
		return pk, nil
	}
	r := a.rules.Load()
	if r.acl == nil || r.acl.Allowed(cl.ID, string(cl.Properties.Username), pk.TopicName, mosquitto.Write) {
		return pk, nil
	}
	a.logDenied(cl, pk.TopicName, mosquitto.Write)
	return pk, packets.CodeSuccessIgnore
}

// OnDisconnect forgets the connection's logged-denial mark.
func (a *Auth) OnDisconnect(cl *mqtt.Client, _ error, _ bool) {
	if _, ok := a.logged.LoadAndDelete(cl); ok {
		a.loggedN.Add(-1)
	}
}

// logDenied counts every denial and logs only the first per connection:
// deliveries are checked per message, so a subscriber to "#" with a narrow
// ACL would otherwise log on every message.
func (a *Auth) logDenied(cl *mqtt.Client, topic string, access mosquitto.Access) {
	if a.opts.OnACLDenied != nil {
		a.opts.OnACLDenied(access.String())
	}
	if _, seen := a.logged.Load(cl); seen {
		return
	}
	if a.loggedN.Load() >= maxLoggedClients {
		a.logged.Clear()
		a.loggedN.Store(0)
	}
	if _, seen := a.logged.LoadOrStore(cl, struct{}{}); seen {
		return
	}
	a.loggedN.Add(1)
	a.log.Info("acl denied; further denials on this connection are only counted",
		"client_id", cl.ID, "username", string(cl.Properties.Username),
		"topic", topic, "access", access.String())
}
