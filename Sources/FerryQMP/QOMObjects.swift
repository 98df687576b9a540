import FerryTLS

/// The user-creatable objects Ferry knows, as QEMU's `object-add` / `-object` take them:
/// `tls-creds-x509` {id, dir, endpoint, verify-peer} and `tls-creds-psk` {id, dir, endpoint, username}.
public enum QOMObjects {
    public static func create(_ props: [String: Any]) throws -> TLSCredentials {
        guard let type = props["qom-type"] as? String else { throw QMPError("Parameter 'qom-type' is missing") }
        guard let id = props["id"] as? String, !id.isEmpty else { throw QMPError("Parameter 'id' is missing") }
        guard id.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" || $0 == "." }), id.first?.isLetter == true else {
            throw QMPError("Parameter 'id' expects an identifier")
        }
        let allowed: Set<String>
        switch type {
        case "tls-creds-x509": allowed = ["qom-type", "id", "dir", "endpoint", "verify-peer", "sanity-check"]
        case "tls-creds-psk": allowed = ["qom-type", "id", "dir", "endpoint", "verify-peer", "username"]
        default: throw QMPError("Invalid parameter 'qom-type': object type '\(type)' is not supported by Ferry (tls-creds-x509, tls-creds-psk)")
        }
        if let extra = props.keys.sorted().first(where: { !allowed.contains($0) }) {
            throw QMPError("Property '\(type).\(extra)' not found")
        }
        guard let dir = props["dir"] as? String, !dir.isEmpty else { throw QMPError("Parameter 'dir' is missing") }
        let endpointName = props["endpoint"] as? String ?? "client"
        guard let endpoint = TLSEndpoint(rawValue: endpointName) else {
            throw QMPError("Parameter 'endpoint' does not accept value '\(endpointName)'")
        }
        let verifyPeer = try bool(props["verify-peer"], "verify-peer") ?? true
        let kind: TLSCredentials.Kind = type == "tls-creds-x509"
            ? .x509(dir: dir)
            : .psk(dir: dir, username: props["username"] as? String ?? "qemu")
        do {
            return try TLSCredentials(id: id, kind: kind, endpoint: endpoint, verifyPeer: verifyPeer)
        } catch {
            throw QMPError("\(error)")
        }
    }

    /// Parses `-object`'s syntax: `TYPE,key=value,...` (`,,` is a literal comma).
    public static func parseCommandLine(_ text: String) throws -> [String: Any] {
        var fields: [String] = []
        var cur = ""
        var it = Array(text).makeIterator()
        while let c = it.next() {
            if c == "," {
                // QEMU's option syntax doubles a comma to put one in a value.
                if let n = it.next() {
                    if n == "," { cur.append(","); continue }
                    fields.append(cur); cur = String(n); continue
                }
                fields.append(cur); cur = ""; continue
            }
            cur.append(c)
        }
        fields.append(cur)
        guard let type = fields.first, !type.isEmpty, !type.contains("=") else { throw QMPError("-object: expected TYPE,id=ID,... in '\(text)'") }
        var props: [String: Any] = ["qom-type": type]
        for f in fields.dropFirst() where !f.isEmpty {
            guard let eq = f.firstIndex(of: "=") else { throw QMPError("-object: '\(f)' is not key=value") }
            let k = String(f[..<eq]), v = String(f[f.index(after: eq)...])
            switch v {
            case "on", "yes", "true": props[k] = k == "verify-peer" || k == "sanity-check" ? true : v
            case "off", "no", "false": props[k] = k == "verify-peer" || k == "sanity-check" ? false : v
            default: props[k] = v
            }
        }
        return props
    }

    private static func bool(_ v: Any?, _ key: String) throws -> Bool? {
        guard let v else { return nil }
        guard let b = v as? Bool else { throw QMPError("Invalid parameter type for '\(key)', expected: boolean") }
        return b
    }
}
