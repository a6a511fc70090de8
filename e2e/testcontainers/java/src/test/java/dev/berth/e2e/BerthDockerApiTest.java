package dev.berth.e2e;

import static org.junit.jupiter.api.Assertions.assertEquals;

import java.io.InputStream;
import java.net.URI;
import java.nio.charset.StandardCharsets;
import org.junit.jupiter.api.Test;
import org.testcontainers.containers.Container.ExecResult;
import org.testcontainers.containers.GenericContainer;
import org.testcontainers.containers.Network;
import org.testcontainers.containers.wait.strategy.Wait;
import org.testcontainers.images.builder.Transferable;
import org.testcontainers.utility.DockerImageName;

/**
 * testcontainers-java with its defaults (Ryuk on, startup checks on), configured by DOCKER_HOST
 * alone, against Berth's docker-shim. The image comes from -Dberth.image.
 */
class BerthDockerApiTest {
  private static final DockerImageName IMAGE =
      DockerImageName.parse(System.getProperty("berth.image"));
  private static final String SERVE =
      "mkdir -p /www && echo pong > /www/index.html && echo ready && exec httpd -f -p 8080 -h /www";

  @Test
  void aGenericContainerWithAWaitStrategyIsReachedFromTheHost() throws Exception {
    try (GenericContainer<?> web =
        new GenericContainer<>(IMAGE)
            .withCommand("sh", "-c", SERVE)
            .withExposedPorts(8080)
            .withCopyToContainer(Transferable.of("copied before start\n"), "/etc/berth/copied.txt")
            .waitingFor(Wait.forHttp("/").forStatusCode(200))) {
      web.start();
      URI page = URI.create("http://" + web.getHost() + ":" + web.getMappedPort(8080) + "/");
      try (InputStream in = page.toURL().openStream()) {
        assertEquals("pong\n", new String(in.readAllBytes(), StandardCharsets.UTF_8));
      }
      ExecResult r = web.execInContainer("sh", "-c", "echo hi; echo oops >&2; exit 4");
      assertEquals(4, r.getExitCode());
      assertEquals("hi\n", r.getStdout());
      assertEquals("oops\n", r.getStderr());
      assertEquals(
          "copied before start\n",
          web.execInContainer("cat", "/etc/berth/copied.txt").getStdout());
    }
  }

  @Test
  void twoContainersTalkOverANetworkAlias() throws Exception {
    try (Network net = Network.newNetwork();
        GenericContainer<?> db =
            new GenericContainer<>(IMAGE)
                .withCommand("sh", "-c", SERVE)
                .withNetwork(net)
                .withNetworkAliases("db")
                .waitingFor(Wait.forLogMessage(".*ready.*", 1));
        GenericContainer<?> client =
            new GenericContainer<>(IMAGE)
                .withCommand("sleep", "600")
                .withNetwork(net)) {
      db.start();
      client.start();
      ExecResult r = client.execInContainer("wget", "-qO-", "http://db:8080/");
      assertEquals(0, r.getExitCode(), r.getStderr());
      assertEquals("pong\n", r.getStdout());
    }
  }
}
