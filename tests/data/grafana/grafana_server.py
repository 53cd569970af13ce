"""Stands in for grafana-server (grafana/grafana's /run.sh): the contract gpufleet relies on.

Configuration from GF_<SECTION>_<KEY> variables (or GF_<SECTION>_<KEY>__FILE, a file holding
the value), as Grafana reads them; its state in SQLite at $GF_PATHS_DATA/grafana.db; the
datasources and file-provisioned dashboards of $GF_PATHS_PROVISIONING read at start and written
to the database only when they changed (so a start changes nothing it need not); the admin user
made at the first start from GF_SECURITY_ADMIN_USER and GF_SECURITY_ADMIN_PASSWORD, never
changed by later starts; an HTTP API on port 3000 with basic auth: /api/health,
/api/dashboards/db, /api/dashboards/uid/<uid>, /api/search, /api/datasources/uid/<uid>,
/api/admin/users, /api/users/lookup.
"""

import base64
import datetime
import glob
import hashlib
import hmac
import json
import os
import secrets
import signal
import sqlite3
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, urlsplit

import yaml


def setting(name, default):
    value = os.environ.get(name)
    path = os.environ.get(name + "__FILE")
    if not value and path:
        with open(path, encoding="utf-8") as source:
            value = source.read().strip()
    return value if value else default


DATA = setting("GF_PATHS_DATA", "/var/lib/grafana")
PROVISIONING = setting("GF_PATHS_PROVISIONING", "/etc/grafana/provisioning")
DATABASE = os.path.join(DATA, setting("GF_DATABASE_PATH", "grafana.db"))
PORT = int(setting("GF_SERVER_HTTP_PORT", "3000"))
ADDRESS = setting("GF_SERVER_HTTP_ADDR", "0.0.0.0")  # noqa: S104  (as Grafana: every interface)
ANONYMOUS = setting("GF_AUTH_ANONYMOUS_ENABLED", "false").lower() == "true"
SCHEMA = """
CREATE TABLE IF NOT EXISTS user (
    id INTEGER PRIMARY KEY AUTOINCREMENT, login TEXT NOT NULL UNIQUE, email TEXT NOT NULL,
    name TEXT NOT NULL, password TEXT NOT NULL, salt TEXT NOT NULL, is_admin INTEGER NOT NULL,
    created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dashboard (
    id INTEGER PRIMARY KEY AUTOINCREMENT, uid TEXT NOT NULL UNIQUE, title TEXT NOT NULL,
    data TEXT NOT NULL, version INTEGER NOT NULL, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dashboard_provisioning (
    dashboard_id INTEGER PRIMARY KEY, name TEXT NOT NULL, external_id TEXT NOT NULL,
    check_sum TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS data_source (
    id INTEGER PRIMARY KEY AUTOINCREMENT, uid TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
    type TEXT NOT NULL, url TEXT NOT NULL, is_default INTEGER NOT NULL, definition TEXT NOT NULL);
"""


def connect():
    return sqlite3.connect(DATABASE, timeout=30)


def now():
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def password_hash(password, salt):
    # Grafana's: PBKDF2-HMAC-SHA256, 10000 rounds, 50 bytes, hex.
    return hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), 10000, 50).hex()


def add_user(database, login, email, name, password, is_admin):
    salt = secrets.token_hex(5)
    cursor = database.execute(
        "INSERT INTO user (login, email, name, password, salt, is_admin, created) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (login, email, name, password_hash(password, salt), salt, int(is_admin), now()),
    )
    return cursor.lastrowid


def start():
    with connect() as database:
        database.executescript(SCHEMA)
        admin = setting("GF_SECURITY_ADMIN_USER", "admin")
        if database.execute("SELECT 1 FROM user WHERE login = ?", (admin,)).fetchone() is None:
            password = setting("GF_SECURITY_ADMIN_PASSWORD", "admin")
            add_user(database, admin, "admin@localhost", "admin", password, True)
            print(f"created the admin user {admin}", file=sys.stderr)
        provision_datasources(database)
        provision_dashboards(database)
    database.close()


def provision_datasources(database):
    for path in sorted(glob.glob(os.path.join(PROVISIONING, "datasources", "*.y*ml"))):
        with open(path, encoding="utf-8") as source:
            document = yaml.safe_load(source) or {}
        for item in document.get("datasources") or []:
            uid = item.get("uid") or item["name"]
            definition = json.dumps(item, sort_keys=True)
            row = (
                item["name"],
                item["type"],
                item.get("url", ""),
                int(bool(item.get("isDefault"))),
            )
            found = database.execute(
                "SELECT name, type, url, is_default, definition FROM data_source WHERE uid = ?",
                (uid,),
            ).fetchone()
            if found == (*row, definition):
                continue
            database.execute("DELETE FROM data_source WHERE uid = ?", (uid,))
            database.execute(
                "INSERT INTO data_source (uid, name, type, url, is_default, definition) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (uid, *row, definition),
            )
            print(f"provisioned datasource {uid} from {path}", file=sys.stderr)


def provision_dashboards(database):
    for path in sorted(glob.glob(os.path.join(PROVISIONING, "dashboards", "*.y*ml"))):
        with open(path, encoding="utf-8") as source:
            document = yaml.safe_load(source) or {}
        for provider in document.get("providers") or []:
            folder = (provider.get("options") or {}).get("path", "")
            for file in sorted(glob.glob(os.path.join(folder, "**", "*.json"), recursive=True)):
                with open(file, "rb") as source:
                    text = source.read()
                check_sum = hashlib.sha256(text).hexdigest()
                known = database.execute(
                    "SELECT check_sum FROM dashboard_provisioning WHERE external_id = ?", (file,)
                ).fetchone()
                if known == (check_sum,):
                    continue
                dashboard = json.loads(text)
                dashboard_id = save_dashboard(database, dashboard, overwrite=True)
                database.execute(
                    "INSERT OR REPLACE INTO dashboard_provisioning "
                    "(dashboard_id, name, external_id, check_sum) VALUES (?, ?, ?, ?)",
                    (dashboard_id, provider["name"], file, check_sum),
                )
                print(f"provisioned dashboard {dashboard.get('uid')} from {file}", file=sys.stderr)


def save_dashboard(database, dashboard, overwrite):
    uid = dashboard.get("uid") or secrets.token_hex(7)
    found = database.execute("SELECT id, version FROM dashboard WHERE uid = ?", (uid,)).fetchone()
    if found and not overwrite:
        return None
    version = found[1] + 1 if found else 1
    stored = {**dashboard, "uid": uid, "version": version}
    stored.pop("id", None)
    title = dashboard.get("title") or "New dashboard"
    if found:
        database.execute(
            "UPDATE dashboard SET title = ?, data = ?, version = ? WHERE id = ?",
            (title, json.dumps(stored, sort_keys=True), version, found[0]),
        )
        return found[0]
    cursor = database.execute(
        "INSERT INTO dashboard (uid, title, data, version, created) VALUES (?, ?, ?, ?, ?)",
        (uid, title, json.dumps(stored, sort_keys=True), version, now()),
    )
    return cursor.lastrowid


class Handler(BaseHTTPRequestHandler):
    server_version = "grafana-standin"

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def user(self, database):
        """(id, is_admin) of the basic-auth login, or None."""
        kind, _, token = self.headers.get("Authorization", "").partition(" ")
        if kind.lower() != "basic":
            return None
        try:
            login, _, password = base64.b64decode(token).decode().partition(":")
        except ValueError:
            return None
        row = database.execute(
            "SELECT id, password, salt, is_admin FROM user WHERE login = ? OR email = ?",
            (login, login),
        ).fetchone()
        if row is None or not hmac.compare_digest(row[1], password_hash(password, row[2])):
            return None
        return row[0], bool(row[3])

    def body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")

    def do_GET(self):
        self.handle_request("GET")

    def do_POST(self):
        self.handle_request("POST")

    def handle_request(self, method):
        url = urlsplit(self.path)
        try:
            database = connect()
        except sqlite3.Error as error:
            self.answer(503, {"database": "failing", "message": str(error)})
            return
        try:
            with database:
                if url.path == "/api/health":
                    database.execute("SELECT count(*) FROM user").fetchone()
                    body = {"commit": "stand-in", "database": "ok", "version": "11.2.2"}
                    self.answer(200, body)
                    return
                user = self.user(database)
                if user is None and not (ANONYMOUS and method == "GET"):
                    self.answer(401, {"message": "Unauthorized"})
                    return
                self.route(database, method, url, user)
        except sqlite3.Error as error:
            self.answer(
                503 if url.path == "/api/health" else 500,
                {"database": "failing", "message": str(error)},
            )
        finally:
            database.close()

    def route(self, database, method, url, user):
        path = url.path
        if method == "POST" and path == "/api/dashboards/db":
            request = self.body()
            dashboard = request.get("dashboard") or {}
            dashboard_id = save_dashboard(database, dashboard, bool(request.get("overwrite")))
            if dashboard_id is None:
                self.answer(
                    412,
                    {
                        "status": "name-exists",
                        "message": "A dashboard with the same uid already exists",
                    },
                )
                return
            uid, version = database.execute(
                "SELECT uid, version FROM dashboard WHERE id = ?", (dashboard_id,)
            ).fetchone()
            self.answer(
                200,
                {
                    "id": dashboard_id,
                    "uid": uid,
                    "status": "success",
                    "version": version,
                    "url": f"/d/{uid}",
                },
            )
        elif method == "GET" and path.startswith("/api/dashboards/uid/"):
            uid = path.rsplit("/", 1)[1]
            row = database.execute(
                "SELECT d.id, d.data, d.version, p.dashboard_id FROM dashboard d "
                "LEFT JOIN dashboard_provisioning p ON p.dashboard_id = d.id WHERE d.uid = ?",
                (uid,),
            ).fetchone()
            if row is None:
                self.answer(404, {"message": "Dashboard not found"})
                return
            dashboard = {**json.loads(row[1]), "id": row[0]}
            meta = {"version": row[2], "provisioned": row[3] is not None, "url": f"/d/{uid}"}
            self.answer(200, {"dashboard": dashboard, "meta": meta})
        elif method == "GET" and path == "/api/search":
            rows = database.execute(
                "SELECT id, uid, title FROM dashboard ORDER BY title"
            ).fetchall()
            self.answer(
                200, [{"id": i, "uid": u, "title": t, "type": "dash-db"} for i, u, t in rows]
            )
        elif method == "GET" and path.startswith("/api/datasources/uid/"):
            row = database.execute(
                "SELECT id, definition FROM data_source WHERE uid = ?", (path.rsplit("/", 1)[1],)
            ).fetchone()
            if row is None:
                self.answer(404, {"message": "Data source not found"})
                return
            self.answer(200, {**json.loads(row[1]), "id": row[0]})
        elif path == "/api/admin/users" and method == "POST":
            if user is None or not user[1]:
                self.answer(403, {"message": "Permission denied"})
                return
            request = self.body()
            try:
                user_id = add_user(
                    database,
                    request["login"],
                    request.get("email") or request["login"],
                    request.get("name") or request["login"],
                    request["password"],
                    False,
                )
            except sqlite3.IntegrityError:
                self.answer(412, {"message": "User with same email or login already exists"})
                return
            self.answer(200, {"id": user_id, "message": "User created"})
        elif method == "GET" and path == "/api/users/lookup":
            login = parse_qs(url.query).get("loginOrEmail", [""])[0]
            row = database.execute(
                "SELECT id, login, email, name, is_admin FROM user WHERE login = ? OR email = ?",
                (login, login),
            ).fetchone()
            if row is None:
                self.answer(404, {"message": "user not found"})
                return
            keys = ("id", "login", "email", "name", "isGrafanaAdmin")
            self.answer(200, dict(zip(keys, (*row[:4], bool(row[4])), strict=True)))
        else:
            self.answer(404, {"message": "Not found"})

    def log_message(self, format, *args):  # the request line only: never a header
        print(f"{self.address_string()} {format % args}", file=sys.stderr)


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # PID 1 ignores it otherwise
    start()
    server = HTTPServer((ADDRESS, PORT), Handler)
    print(f"HTTP Server Listen address={ADDRESS}:{PORT} database={DATABASE}", file=sys.stderr)
    server.serve_forever()


if __name__ == "__main__":
    main()
