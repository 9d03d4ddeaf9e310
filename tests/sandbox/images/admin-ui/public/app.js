// What Ketesa does on its login page, reduced: the homeserver comes from config.json
// (restrictBaseUrl), the login is the client API's, and the lists come from the admin API.
(async () => {
  const config = await (await fetch("config.json", {cache: "no-store"})).json();
  const base = config.restrictBaseUrl;
  document.getElementById("base").textContent = base || "(any: restrictBaseUrl is not set)";
  const out = document.getElementById("out");
  document.getElementById("login").addEventListener("submit", async (event) => {
    event.preventDefault();
    const login = await fetch(base + "/_matrix/client/v3/login", {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({
        type: "m.login.password",
        identifier: {type: "m.id.user", user: document.getElementById("user").value},
        password: document.getElementById("password").value,
      }),
    });
    const token = (await login.json()).access_token;
    const users = await fetch(base + "/_synapse/admin/v2/users?from=0&limit=100", {
      headers: {Authorization: "Bearer " + token},
    });
    out.textContent = JSON.stringify(await users.json(), null, 2);
  });
})();
