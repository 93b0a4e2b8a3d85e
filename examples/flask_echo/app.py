# JeraSoft's documented example handler: route /api, GET and POST, parses the request body as JSON
# and returns it re-serialised. As an after-stage handler its reply is just logged; as a
# before-stage handler an unchanged echo means "allow".
#
#   pip install flask && python app.py      (listens on 0.0.0.0:5000)
#   relay handlers add flask-echo --event 'clients.*' --http http://127.0.0.1:5000/api
import json
import os

from flask import Flask, request

app = Flask(__name__)


@app.route("/api", methods=["GET", "POST"])
def api():
    data = request.get_json(force=True, silent=True)
    print(json.dumps(data), flush=True)
    return json.dumps(data)


if __name__ == "__main__":
    app.run(host=os.environ.get("HOST", "0.0.0.0"), port=int(os.environ.get("PORT", "5000")))
