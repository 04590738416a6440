"""Drives the nanochat web UI in headless Chromium (Debian `chromium` + `chromium-driver`, Python `selenium`),
as tests/serve.rs runs it: set temperature 0, send a message, see the streamed reply, regenerate it, edit the
question and regenerate from there, check that markup typed by the user shows as text, take a screenshot.
With `stop` instead of a screenshot path: send a message, press Stop while the reply streams.

Usage: python3 browser_test.py URL SCREENSHOT.png | python3 browser_test.py URL stop
Prints one JSON object with what the page showed; exits non-zero on any failure.
"""
import json
import sys

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

url, screenshot = sys.argv[1], sys.argv[2]
options = webdriver.ChromeOptions()
options.binary_location = "/usr/bin/chromium"
for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1000,800"):
    options.add_argument(flag)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
wait = WebDriverWait(driver, 30)


def idle(d):
    """The reply has finished streaming: the send button is back."""
    return d.execute_script("return document.getElementById('send').style.display !== 'none'")


def texts(selector):
    # read in one script: the page redraws its messages, so element handles go stale
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(e => e.textContent)", selector)


def replies():
    return texts(".msg.assistant")


def type_and_send(text):
    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def stop():
    """Presses Stop mid-reply; the partial reply stays."""
    type_and_send("go")
    wait.until(lambda d: replies() and replies()[0] not in ("", "…") and not idle(d))
    driver.find_element(By.ID, "stop").click()
    wait.until(idle)
    print(json.dumps({"replies": replies(), "sent": texts(".msg.user")}))


try:
    driver.get(url)
    if screenshot == "stop":
        stop()
        sys.exit(0)
    type_and_send("/temperature 0")
    notes = texts(".note")

    # Shift+Enter adds a line, Enter sends
    box = driver.find_element(By.ID, "input")
    box.send_keys("Hello")
    box.send_keys(Keys.SHIFT, Keys.ENTER)
    box.send_keys("there")
    box.send_keys(Keys.ENTER)
    wait.until(lambda d: len(replies()) == 1 and idle(d))
    first = replies()[0]
    question = texts(".msg.user")[0]

    # click the reply: regenerated in place, the same at temperature 0
    driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[0].click()
    wait.until(lambda d: len(replies()) == 1 and idle(d))
    regenerated = replies()[0]

    # click the question: edit it, Enter regenerates from there
    driver.find_elements(By.CSS_SELECTOR, ".msg.user")[0].click()
    editor = driver.find_element(By.CSS_SELECTOR, ".msg.user textarea")
    editor.clear()
    editor.send_keys("What is 2+2?")
    editor.send_keys(Keys.ENTER)
    wait.until(lambda d: len(replies()) == 1 and idle(d))
    edited = texts(".msg.user")[0]

    # markup typed by the user stays text
    type_and_send("<img src=x onerror=alert(1)><b>bold</b>")
    wait.until(lambda d: len(replies()) == 2 and idle(d))
    injected = texts(".msg.user")[1]
    markup = len(driver.find_elements(By.CSS_SELECTOR, "#messages img, #messages b"))

    driver.save_screenshot(screenshot)
    print(json.dumps({
        "notes": notes, "question": question, "first": first, "regenerated": regenerated,
        "edited": edited, "replies": replies(), "injected": injected, "markup_elements": markup,
    }))
finally:
    driver.quit()
